"""The `grpo` kind on the tiny model: it trains (a reward that varies in a group moves the
weights), its KL reference is the input model (LoRA: the adapter disabled; full: a copy reloaded
from the input artifact's directory), bad settings are refused before anything trains, and the
zero-variance warning fires when rewards never vary."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from conftest import medpipe, read_artifact

# A reward that varies within a group on a random tiny model: the completion's length in
# characters (a random model's answers are never right, so mcq_exact alone would be flat).
GRPO = ("grpo: {{kind: grpo, data: '${{data.medqa}}', lr: 5e-2, max_steps: {steps}, batch_size: 4, num_generations: 2, "
        "max_completion_length: 8, heldout: 0.1, beta: 0.1, save_steps: 1, {extra} "
        "rewards: [{{name: length, scale: 0.01, unit: chars}}, {{name: mcq_exact}}]}}")


def recipe(tmp_path: Path, *stages: str, defaults: str = "") -> Path:
    r = tmp_path / "g.yaml"
    r.write_text(f"defaults: [base, model: tiny, data: sample, {defaults}_self_]\nname: g\nstages:\n"
                 + "".join(textwrap.indent(s, "  ") + "\n" for s in stages))
    return r


def run(tmp_path: Path, *stages: str, extra: tuple = ()) -> Path:
    run_dir = tmp_path / "runs" / "r"
    r = medpipe("run", f"recipe={recipe(tmp_path, *stages)}", f"run.root={tmp_path}/runs", f"run.dir={run_dir}", *extra)
    assert r.code == 0, r.out
    return run_dir


def logps(model_dir: str, probe: dict):
    """Per-token log-probs of the probe's completions under the model in `model_dir`, computed
    here from scratch (logits / temperature, as TRL scores them)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.cat([probe["prompt_ids"], probe["completion_ids"]], 1)
    mask = torch.cat([probe["prompt_mask"], probe["completion_mask"]], 1)
    n = probe["completion_ids"].shape[1]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -n - 1:-1].float() / probe["temperature"]
    return torch.log_softmax(logits, -1).gather(-1, probe["completion_ids"].unsqueeze(-1)).squeeze(-1)


def same_on_mask(a, b, mask) -> bool:
    import torch

    return bool(torch.allclose(a[mask.bool()], b[mask.bool()], atol=1e-4))


def trainable_changed(before_dir: str, after_dir: str) -> bool:
    from safetensors.torch import load_file

    def weights(d):
        out = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            out.update(load_file(f))
        return out

    a, b = weights(before_dir), weights(after_dir)
    assert a.keys() == b.keys()
    return any(not (a[k] == b[k]).all() for k in a)


@pytest.mark.slow
def test_lora_grpo_trains_and_its_reference_is_the_input_model(tmp_path):
    import torch

    run_dir = run(tmp_path, GRPO.format(steps=3, extra="peft: {r: 4, alpha: 8, dropout: 0.0},"))
    sdir = (run_dir / "01-grpo").resolve()
    art = read_artifact(sdir)
    hist = [json.loads(l) for l in (sdir / "log_history.jsonl").read_text().splitlines()]
    steps = [h for h in hist if "frac_reward_zero_std" in h]
    assert len(steps) == 3 and all("rewards/length/mean" in h and "rewards/mcq_exact/mean" in h for h in steps)
    assert min(h["frac_reward_zero_std"] for h in steps) < 1.0          # the length reward varied in a group
    assert any(h["grad_norm"] > 0 for h in steps)
    input_dir = art["base_model_path"]
    assert trainable_changed(input_dir, art["merged_path"])              # the update reached the weights
    probe = torch.load(sdir / "ref_probe.pt")
    assert probe["step"] == 2  # the third batch: generated after two updates, the policy had moved
    # the reference TRL used = the input model (the LoRA adapter disabled), recomputed from its files
    assert same_on_mask(probe["ref_per_token_logps"], logps(input_dir, probe), probe["completion_mask"])
    assert not same_on_mask(probe["ref_per_token_logps"], logps(art["merged_path"], probe), probe["completion_mask"])
    m = art["metrics"]
    assert m["prompts"] == 54 and m["heldout"] == 6 and m["heldout_before/n"] == 6 and m["heldout_after/n"] == 6
    assert m["heldout_before/format_valid"] == 0.0 and m["heldout_before/accuracy"] == 0.0


@pytest.mark.slow
def test_full_grpo_reference_reloads_from_the_previous_stage(tmp_path):
    """Full training: TRL reloads the reference from config._name_or_path: it must be the SFT
    stage's model (the input), not the recipe's base model."""
    import torch

    sft = "sft: {kind: sft, data: '${data.dialogue}', lr: 5e-3, max_steps: 2, batch_size: 4, max_length: 96}"
    run_dir = run(tmp_path, sft, GRPO.format(steps=1, extra="heldout_eval: false,"))
    sft_dir = read_artifact(run_dir / "01-sft")["model_path"]
    gdir = (run_dir / "02-grpo").resolve()
    art = read_artifact(gdir)
    assert art["format"] == "full"
    probe = torch.load(gdir / "ref_probe.pt")
    from medpipe.stages.models.tiny import ensure_tiny

    assert same_on_mask(probe["ref_per_token_logps"], logps(sft_dir, probe), probe["completion_mask"])
    assert not same_on_mask(probe["ref_per_token_logps"], logps(str(ensure_tiny()), probe), probe["completion_mask"])
    assert trainable_changed(sft_dir, art["model_path"])


def test_validate_refuses_what_trl_would(tmp_path):
    r = recipe(tmp_path, GRPO.format(steps=2, extra=""), defaults="stage/grpo@stages.grpo, ")
    cases = {("stages.grpo.num_generations=1",): "stages.grpo: num_generations must be >= 2",
             ("stages.grpo.batch_size=6", "stages.grpo.num_generations=4"):
                 "stages.grpo: batch_size must be a multiple of num_generations (4)",
             ("stages.grpo.rewards=[{name: nope}]",): "rewards[0].name: unknown reward 'nope'",
             ("stages.grpo.loss_type=ppo",): "stages.grpo: loss_type must be one of grpo, dapo",
             ("stages.grpo.keep_best=true",): "keep_best must be false (GRPO has no held-out loss",
             ("stages.grpo.rewards=[{name: format, valdi: 1}]",):
                 "rewards[0] (format): Format.__init__() got an unexpected keyword argument 'valdi'",
             ("stages.grpo.rewards=[{python: 'no_such_module:f'}]",):
                 "python reward 'no_such_module:f' cannot be loaded: ModuleNotFoundError"}
    for overrides, line in cases.items():
        out = medpipe("validate", f"recipe={r}", *overrides)
        assert out.code == 2 and line in out.out, out.out
        assert "Traceback" not in out.out
    ok = medpipe("validate", f"recipe={r}")
    assert ok.code == 0, ok.out
    assert "mcq_medqa.jsonl" in ok.out


def test_batch_divides_over_ranks(tmp_path):
    from medpipe.stages.grpo import GRPOParams

    p = GRPOParams(batch_size=8, num_generations=4)
    assert p.batch_layout(2) == (4, 1)
    with pytest.raises(ValueError, match="batch_size 8 .global. does not divide over 3 ranks"):
        p.batch_layout(3)


def test_zero_variance_warning(tmp_path):
    from types import SimpleNamespace

    from medpipe.stages.training.rl_callbacks import RewardWatch

    said: list[str] = []
    w = RewardWatch(SimpleNamespace(say=said.append), first_steps=3)
    state = SimpleNamespace(is_world_process_zero=True, global_step=0)
    for step, frac in enumerate([1.0, 1.0, 1.0, 0.5], 1):
        state.global_step = step
        w.on_log(None, state, None, logs={"frac_reward_zero_std": frac, "reward": 0.0,
                                          "rewards/mcq_exact/mean": 0.0})
    warnings = [s for s in said if s.startswith("warning:")]
    assert len(warnings) == 1 and "zero reward variance in each of the first 3 logged steps" in warnings[0]
    assert said[0] == "step 1: reward 0.000 (mcq_exact 0.000); zero-variance groups 1.00"
    assert w.metrics()["zero_std_warning"] == 1
    quiet: list[str] = []
    w2 = RewardWatch(SimpleNamespace(say=quiet.append), first_steps=3)
    for frac in (1.0, 0.5, 1.0):
        w2.on_log(None, state, None, logs={"frac_reward_zero_std": frac, "reward": 0.0})
    assert not [s for s in quiet if s.startswith("warning:")]
