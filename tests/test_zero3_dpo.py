"""DPO under DeepSpeed ZeRO-3 (`deepspeed=zero3`), full and LoRA, on 2 CPU processes (gloo) through
the real `deepspeed` launcher: the policy (and, for full DPO, TRL's frozen reference copy) is loaded
partitioned, TRL's fused lm-head gathers it, every rank takes part in the reference probe's forward;
the weights after N steps equal the ZeRO-2 run's within fp32 tolerance, as do the reference
log-probs, and the saved models load with plain `from_pretrained`."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import medpipe, ran_on_two_ranks

# both from the recipe's (tiny) model: full DPO (a separate frozen reference) and LoRA DPO (the
# adapter disabled is the reference); checkpoints at step 2, 3 steps
RECIPE = """
defaults: [base, model: tiny, data: sample, stage/dpo@stages.full, stage/dpo@stages.lora, _self_]
name: zd
stages:
  full: {from: base, data: "${data.preference}", lr: 5e-4, max_steps: 3, save_steps: 2, logging_steps: 1, batch_size: 4,
         max_length: 128, reward_eval_pairs: 8, ref_probe: 4}
  lora: {from: base, data: "${data.preference}", lr: 5e-3, max_steps: 3, save_steps: 2, logging_steps: 1, batch_size: 4,
         max_length: 128, reward_eval_pairs: 8, ref_probe: 4, peft: {r: 4, alpha: 8}}
"""
STAGES = {"01-full": "model", "02-lora": "merged"}


def _run(tmp: Path, zero: str, port: int) -> Path:
    recipe = tmp / "zd.yaml"
    recipe.write_text(RECIPE)
    root = tmp / zero / "runs"  # its own store: the ZeRO stage is not part of a stage's key
    run_dir = root / zero
    r = medpipe("run", f"recipe={recipe}", f"run.root={root}", f"run.dir={run_dir}", "launcher=deepspeed",
                "launcher.num_gpus=2", f"launcher.master_port={port}", f"deepspeed={zero}")
    assert r.code == 0, r.out
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero_dpo")
    return {"zero2": _run(tmp, "zero2", 29591), "zero3": _run(tmp, "zero3", 29601)}



def _weights(run_dir: Path, link: str) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str((run_dir / link).resolve() / STAGES[link]))  # plain
    return {k: v.float() for k, v in model.state_dict().items()}


def _worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.extended
def test_zero3_dpo_full_and_lora_equal_zero2(runs):
    import torch

    from medpipe.stages.models.loader import load_causal_lm

    # both stages start from the recipe's model: the LoRA stage's artifact names it
    base = load_causal_lm(ran_on_two_ranks(runs["zero2"], "02-lora", 2)["base_model_path"], dtype=torch.float32,
                          trust_remote_code=False).state_dict()
    for link in STAGES:
        two, three = ran_on_two_ranks(runs["zero2"], link, 2), ran_on_two_ranks(runs["zero3"], link, 3)
        assert three["metrics"]["steps"] == two["metrics"]["steps"] == 3
        for m in ("first_loss", "last_loss", "reward_accuracy", "reward_margin"):
            assert abs(three["metrics"][m] - two["metrics"][m]) < 1e-4, (link, m, two["metrics"][m], three["metrics"][m])
        a, b = _weights(runs["zero2"], link), _weights(runs["zero3"], link)
        worst = _worst(a, b)
        assert worst < 1e-5, f"{link}: max |zero2 - zero3| = {worst}"
        # the run trained: the weights moved away from the input (the tiny base model)
        assert _worst(b, base) > 1e-4, f"{link} did not move from its input"
        # the reference log-probs (all ranks ran the probe's forward under ZeRO-3) are the ZeRO-2 run's
        p2, p3 = (torch.load((r / link).resolve() / "ref_probe.pt") for r in (runs["zero2"], runs["zero3"]))
        assert torch.equal(p2["input_ids"], p3["input_ids"]) and p3["ref_chosen_logps"].numel() == 4
        for k in ("ref_chosen_logps", "ref_rejected_logps"):
            assert torch.allclose(p2[k], p3[k], atol=1e-4), (link, k, p2[k], p3[k])

