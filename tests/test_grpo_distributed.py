"""`grpo` under the real DeepSpeed launcher: 2 CPU processes (gloo), ZeRO-2. It trains (both
replicas end with the same weights), rank 0 alone writes, the saved adapter loads back into exactly
the trained weights, and `batch_size` counts completions for the whole world: one rank and two
ranks generate and consume the same global batch per optimizer step."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conftest import medpipe, read_artifact, run_on_two_ranks, zero2_stage

# batch_size 8 completions = 2 prompts × 4 generations per optimizer step: micro 2 × accumulation 4
# on one rank, micro 2 × accumulation 2 × 2 ranks on two. A length reward varies on a random model.
GRPO = """
defaults: [base, model: tiny, data: sample, stage/grpo@stages.grpo, _self_]
name: rl2
stages:
  grpo: {data: "${data.medqa}", lr: 5e-2, max_steps: 2, batch_size: 8, micro_batch_size: 2, num_generations: 4,
         max_completion_length: 8, logging_steps: 1, save_steps: 50, heldout: 0.1, peft: {r: 4, alpha: 8},
         rewards: [{name: length, scale: 0.01, unit: chars}]}
"""


def adapter_digest(art: dict) -> str:
    """The trainable weights' sha256 as the stage logs it, recomputed from the SAVED adapter loaded
    onto the input model (names and order as in stages/training/loop.py)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(art["base_model_path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, art["model_path"], is_trainable=True)
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def logged_digest(sdir: Path) -> str:
    import re

    return re.search(r"weights_sha256=(\w+)", (sdir / "logs" / "rank0.log").read_text()).group(1)


@pytest.mark.slow
@pytest.mark.distributed
def test_grpo_under_deepspeed_zero2_on_two_processes(tmp_path):
    import torch

    recipe = tmp_path / "rl2.yaml"
    recipe.write_text(GRPO)
    one_dir = tmp_path / "one" / "main"  # its own store: the 2-rank stage has the same key (same global batch)
    r = medpipe("run", f"recipe={recipe}", f"run.root={tmp_path}/one", f"run.dir={one_dir}")
    assert r.code == 0, r.out
    two_dir = run_on_two_ranks(tmp_path, GRPO, port=29587)
    art = zero2_stage(two_dir, "01-grpo")           # ZeRO-2 on 2 ranks, replicas identical, written once
    seen = {}
    for name, run_dir in (("one", one_dir), ("two", two_dir)):
        sdir = (run_dir / "01-grpo").resolve()
        a = read_artifact(sdir)
        assert a["metrics"]["steps"] == 2
        assert adapter_digest(a) == logged_digest(sdir)   # the saved adapter is exactly what trained
        args = torch.load(Path(a["model_path"]) / "training_args.bin", weights_only=False)
        epochs = [h["epoch"] for h in map(json.loads, (sdir / "log_history.jsonl").read_text().splitlines())
                  if "loss" in h]
        seen[name] = (args.per_device_train_batch_size, args.gradient_accumulation_steps, a["metrics"]["world_size"],
                      args.generation_batch_size, args.num_generations, epochs)
    n = art["metrics"]["prompts"]                  # 2 prompts per optimizer step, whatever the world size
    assert seen["one"] == (2, 4, 1, 8, 4, [pytest.approx(2 * k / n) for k in (1, 2)])
    assert seen["two"] == (2, 2, 2, 8, 4, [pytest.approx(2 * k / n) for k in (1, 2)])
    # the held-out prompts were scored once, on rank 0, before and after
    assert art["metrics"]["heldout_before/n"] == art["metrics"]["heldout_after/n"] == art["metrics"]["heldout"] > 0
