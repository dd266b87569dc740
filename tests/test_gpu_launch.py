"""The GPU launch path (issue 25), as far as CPU can express it: which GPUs a launcher starts
ranks on, the DeepSpeed JSON the driver writes, Slurm resources, precision decided on the ranks."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import medpipe, read_artifact
from medpipe.compose import compose
from medpipe.errors import MedpipeError
from medpipe.launch import command, deepspeed_config


def _launcher(*overrides: str) -> dict:
    from omegaconf import OmegaConf

    cfg, _ = compose("qilin", list(overrides))
    return OmegaConf.to_container(cfg.launcher, resolve=True)


def test_deepspeed_takes_the_gpus_cuda_visible_devices_names(monkeypatch):
    """`deepspeed --num_gpus N` deletes CUDA_VISIBLE_DEVICES and runs on GPUs 0..N-1: with it set,
    the command names the visible ids (the first N) with --include instead."""
    lau = _launcher("launcher=deepspeed", "launcher.num_gpus=2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    cmd = command(lau, Path("/s/stage.json"))
    assert cmd[1:] == ["--include", "localhost:4,5", "--master_port", "29500", "--module", "medpipe.entry",
                       "/s/stage.json"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # empty = unset: all GPUs, counted
    assert command(lau, Path("/s/stage.json"))[1:5] == ["--num_gpus", "2", "--num_nodes", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(MedpipeError, match=r"^launcher.num_gpus=2 but CUDA_VISIBLE_DEVICES=3 makes only 1 GPU"):
        command(lau, Path("/s/stage.json"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f3a,GPU-11c2")
    with pytest.raises(MedpipeError, match=r"deepspeed --include takes GPU indices"):
        command(lau, Path("/s/stage.json"))


@pytest.mark.parametrize("visible, expected", [("4,5,6,7", "--include localhost:4,5,6,7"),
                                               ("2,3,4,5,6", "--include localhost:2,3,4,5"),
                                               (None, "--num_gpus 4"), ("NoDevFiles", "--num_gpus 4")])
def test_slurm_one_node_deepspeed_picks_the_tasks_gpus_in_its_shell(monkeypatch, tmp_path, visible, expected):
    """Under Slurm the task's CUDA_VISIBLE_DEVICES is only known inside the task: the srun line's
    shell expands the choice; run that shell with a stand-in deepspeed that prints its arguments."""
    import os

    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(k)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    lau = _launcher("launcher=slurm", "launcher.num_gpus=4")
    fake = tmp_path / "deepspeed"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    from medpipe import slurm

    cmd = slurm.srun_command(lau, Path("/s/stage.json"), "medpipe.entry", lambda name: str(tmp_path / name))
    assert cmd[-3:-1] == ["bash", "-c"]
    env = {"PATH": "/usr/bin:/bin"} | ({"CUDA_VISIBLE_DEVICES": visible} if visible else {})
    out = subprocess.run(["bash", "-c", cmd[-1]], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == f"{expected} --master_port 29500 --module medpipe.entry /s/stage.json"


def test_deepspeed_json_has_no_optimizer_and_leaves_precision_to_the_ranks():
    """No optimizer block (transformers builds torch AdamW with its no-decay groups; DeepSpeed's
    would JIT-build FusedAdam with nvcc), and bf16/fp16 "auto" whatever the driver has: the HF
    integration fills them on each rank from its TrainingArguments. Only explicit fp32 is fixed."""
    from omegaconf import OmegaConf

    for group in ("zero2", "zero2_offload"):
        cfg, _ = compose("qilin", [f"deepspeed={group}"])
        ds = OmegaConf.to_container(cfg.deepspeed, resolve=True)
        for precision in ("auto", "bf16"):
            out = deepspeed_config(ds, type("P", (), {"precision": precision})())
            assert "optimizer" not in out
            assert out["bf16"] == {"enabled": "auto"} and out["fp16"] == {"enabled": "auto"}
        assert deepspeed_config(ds, type("P", (), {"precision": "fp32"})())["bf16"] == {"enabled": False}
    assert out["zero_force_ds_cpu_optimizer"] is False  # offload: DeepSpeed accepts torch's AdamW


def test_the_driver_writes_auto_precision_into_the_stage_deepspeed_json(tmp_path, monkeypatch):
    """A driver without a GPU (this machine) used to write bf16 false for every rank. The stage's
    deepspeed.json as `run` writes it (the launcher fails here at once: a stand-in deepspeed)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "deepspeed").write_text("#!/bin/sh\nexit 3\n")
    (fake / "deepspeed").chmod(0o755)
    import medpipe.launch as launch

    monkeypatch.setattr(launch, "_bin", lambda name: str(fake / name))
    recipe = tmp_path / "one.yaml"
    recipe.write_text('defaults: [base, model: tiny, data: sample, stage/sft@stages.sft, _self_]\nname: one\n'
                      'stages:\n  sft: {data: "${data.dialogue}", max_steps: 1, batch_size: 2, peft: {r: 4}}\n')
    r = medpipe("run", f"recipe={recipe}", f"run.root={tmp_path}/runs", "launcher=deepspeed")
    assert r.code != 0 and "launcher exited with code 3" in r.out
    written = list((tmp_path / "runs" / ".store").glob("sft-*/deepspeed.json"))
    assert len(written) == 1
    ds = json.loads(written[0].read_text())
    assert ds["bf16"] == {"enabled": "auto"} and "optimizer" not in ds


def test_slurm_resources_default_from_the_gpus_and_show_them():
    from medpipe.slurm import sbatch_resources

    assert sbatch_resources({"gpus_per_node": 8, "cpus_per_gpu": 12}) == {"cpus_per_task": 96, "mem": "0"}
    assert sbatch_resources({"gpus_per_node": 8, "cpus_per_task": 32, "mem": "400G"}) == \
        {"cpus_per_task": 32, "mem": "400G"}
    assert sbatch_resources({"gpus_per_node": 0}) == {"cpus_per_task": None, "mem": None}  # CPU jobs: site default
    r = medpipe("show", "recipe=qilin", "launcher=slurm", "launcher.sbatch.gpus_per_node=8")
    assert r.code == 0, r.out
    assert "#SBATCH --cpus-per-task=64" in r.out and "#SBATCH --mem=0" in r.out


def _completion_logps(model, probe):
    import torch

    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, probe["input_ids"][:, 1:, None])[..., 0]
    return (logp * probe["completion_mask"][:, 1:]).sum(1).chunk(2)


@pytest.mark.slow
@pytest.mark.parametrize("peft", ["null", "{r: 4, alpha: 8}"])
def test_dpo_ref_probe_after_training_is_the_input_models_logprobs(tmp_path, peft):
    """The probe is now computed after training (where DeepSpeed placed the model): it must still be
    the INPUT model's log-probs — LoRA: adapter disabled; full: TRL's frozen reference model — and
    not the trained policy's."""
    import torch
    from transformers import AutoModelForCausalLM

    recipe = tmp_path / "dpo.yaml"
    recipe.write_text('defaults: [base, model: tiny, data: sample, stage/dpo@stages.dpo, _self_]\nname: probe\n'
                      'stages:\n  dpo: {data: "${data.preference}", lr: 5e-3, max_steps: 3, batch_size: 4, '
                      f'max_length: 96, ref_probe: 4, reward_eval_pairs: 0, peft: {peft}}}\n')
    run_dir = tmp_path / "runs" / "main"
    r = medpipe("run", f"recipe={recipe}", f"run.root={tmp_path}/runs", f"run.dir={run_dir}")
    assert r.code == 0, r.out
    sdir = (run_dir / "01-dpo").resolve()
    probe = torch.load(sdir / "ref_probe.pt")
    assert probe["input_ids"].shape[0] == 8  # 4 pairs: chosen then rejected
    stage = json.loads((sdir / "stage.json").read_text())
    art = read_artifact(sdir)
    given = AutoModelForCausalLM.from_pretrained(stage["input"]["model_path"]).eval()
    trained = AutoModelForCausalLM.from_pretrained(art["merged_path"] or art["model_path"]).eval()
    chosen, rejected = _completion_logps(given, probe)
    assert torch.allclose(probe["ref_chosen_logps"], chosen, atol=1e-3)
    assert torch.allclose(probe["ref_rejected_logps"], rejected, atol=1e-3)
    policy, _ = _completion_logps(trained, probe)
    assert (policy - chosen).abs().max() > 1e-2  # the policy did move: the probe is not the policy


def test_paper_recipes_turn_gradient_checkpointing_on_for_real_models_only():
    from medpipe.compose import compose

    for recipe, stages in {"qilin": ("cpt", "sft", "dpo"), "iimedgpt": ("sft", "dpo"), "medcare": ("mka", "da"),
                           "antglm": ("cpt", "sft", "cpoly")}.items():
        real, _ = compose(recipe, ["model=qwen1.5-7b"])
        tiny, _ = compose(recipe, [])
        small, _ = compose(recipe, ["model=smollm2-135m"])
        for s in stages:
            assert real.stages[s].gradient_checkpointing is True, (recipe, s)
            assert tiny.stages[s].gradient_checkpointing is False, (recipe, s)
            assert small.stages[s].gradient_checkpointing is False, (recipe, s)
    r = medpipe("show", "recipe=qilin", "model=qwen1.5-7b")
    assert r.out.count("gradient_checkpointing: true") == 3, r.out  # (exit 2 after the config: no model.path)


def test_checkpointing_arguments_are_non_reentrant():
    from medpipe.stages.training.args import checkpointing_kwargs

    assert checkpointing_kwargs(True) == {"activation_checkpointing": True,
                                          "activation_checkpointing_kwargs": {"use_reentrant": False}}
    assert checkpointing_kwargs(False) == {"activation_checkpointing": False}


SFT_GC = """
defaults: [base, model: tiny, data: sample, stage/sft@stages.sft, _self_]
name: gc
stages:
  sft: {data: "${data.dialogue}", lr: 5e-3, max_steps: 4, logging_steps: 1, batch_size: 4, max_length: 128,
        peft: {r: 4, alpha: 8, dropout: 0.0}, gradient_checkpointing: GC}
"""


@pytest.mark.slow
def test_sft_lora_with_gradient_checkpointing_trains_with_the_same_losses(tmp_path):
    """Checkpointing recomputes activations; it must not change what is learnt: per-step losses of
    a 4-step LoRA SFT on and off agree, the adapter trained, and the trainer really had it on."""
    runs = {}
    for gc in ("true", "false"):
        recipe = tmp_path / f"gc_{gc}.yaml"
        recipe.write_text(SFT_GC.replace("GC", gc))
        run_dir = tmp_path / gc / "main"
        r = medpipe("run", f"recipe={recipe}", f"run.root={tmp_path}/{gc}", f"run.dir={run_dir}")
        assert r.code == 0, r.out
        sdir = (run_dir / "01-sft").resolve()
        losses = [h["loss"] for h in map(json.loads, (sdir / "log_history.jsonl").read_text().splitlines())
                  if "loss" in h]
        runs[gc] = (read_artifact(sdir)["metrics"], losses)
    assert runs["true"][0]["activation_checkpointing"] is True
    assert runs["false"][0]["activation_checkpointing"] is False
    on, off = runs["true"][1], runs["false"][1]
    assert len(on) == len(off) == 4
    assert on == pytest.approx(off, rel=1e-4)
    assert on[-1] < on[0]  # it trained


class _Model:
    """Stands in for a model with hooks: it sits in a reference cycle, so only a collection frees it."""

    def __init__(self):
        self.hook = lambda: self


def test_a_stage_run_in_the_driver_leaves_nothing_behind(tmp_path, monkeypatch):
    """launcher=local stages (and every eval / voc_label stage) run inside the driver: what they
    loaded must be gone when the stage returns (automatic collection off: only the driver's frees)."""
    import gc
    import sys
    import types
    import weakref

    import medpipe.entry as entry
    from medpipe import launch

    refs = []

    def fake_stage(path):
        model = _Model()
        refs.append(weakref.ref(model))

    monkeypatch.setattr(entry, "run_stage_file", fake_stage)
    emptied = []
    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: True,
                                                                  empty_cache=lambda: emptied.append(1)))
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    gc.disable()
    try:
        launch.run({"name": "local"}, tmp_path / "stage.json", tmp_path / "launcher.log")
        alive = refs[0]() is not None
    finally:
        gc.enable()
    assert not alive and emptied == [1]


def test_vllm_gets_explicit_limits_and_is_shut_down_when_dropped(monkeypatch):
    import gc
    import sys
    import types

    from medpipe.stages.inference import backends

    made, stopped = [], []

    class LLM:
        def __init__(self, **kw):
            made.append(kw)
            self.llm_engine = types.SimpleNamespace(engine_core=types.SimpleNamespace(
                shutdown=lambda: stopped.append(kw["model"])))

    fake = types.ModuleType("vllm")
    fake.LLM = LLM
    monkeypatch.setitem(sys.modules, "vllm", fake)
    art = types.SimpleNamespace(model_path=str(_tiny_path()), tokenizer_path=None, trust_remote_code=False)
    b = backends.open_backend(art, "vllm", max_length=1024, model_opts={})
    assert made[0]["gpu_memory_utilization"] == 0.85 and made[0]["max_model_len"] == 1024 + 2048
    del b
    gc.collect()
    assert stopped == [art.model_path]
    b = backends.open_backend(art, "vllm", model_opts={"vllm_gpu_memory_utilization": 0.4, "vllm_max_model_len": 8192})
    assert made[1]["gpu_memory_utilization"] == 0.4 and made[1]["max_model_len"] == 8192
    b.close()
    assert stopped == [art.model_path] * 2
    assert "vllm==0.30.0" in backends.VLLM_HINT


def _tiny_path():
    from medpipe.stages.models.tiny import ensure_tiny

    return ensure_tiny()


def test_attention_flash_for_packed_sft_on_a_gpu_when_installed(monkeypatch):
    """Packed SFT picks flash-attention 2 on a CUDA GPU in bf16 when flash-attn is installed; sdpa
    (None) otherwise; an explicit model.attn_implementation always wins; unpacked stages keep sdpa."""
    import types

    import torch
    import transformers.utils as tu

    from medpipe.stages.training import loop

    def params(packing, precision="auto"):
        return types.SimpleNamespace(packing=packing, precision=precision)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(tu, "is_flash_attn_2_available", lambda *a, **k: True)
    assert loop.pick_attention({}, params(None)) == "flash_attention_2"  # packing auto = on
    assert loop.pick_attention({}, params(True, "fp16")) == "flash_attention_2"
    assert loop.pick_attention({}, params(False)) is None  # padded batches: sdpa
    assert loop.pick_attention({}, types.SimpleNamespace(precision="auto")) is None  # DPO, CPT, ...: no packing
    assert loop.pick_attention({"trust_remote_code": True}, params(None)) is None  # remote code: packing auto off
    assert loop.pick_attention({}, params(True, "fp32")) is None  # flash-attn needs half precision
    assert loop.pick_attention({"attn_implementation": "eager"}, params(True)) == "eager"
    monkeypatch.setattr(tu, "is_flash_attn_2_available", lambda *a, **k: False)
    assert loop.pick_attention({}, params(True)) is None  # not installed: sdpa
    monkeypatch.setattr(tu, "is_flash_attn_2_available", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loop.pick_attention({}, params(True)) is None  # CPU


GPU_CHECK = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.sh"
STEPS = ("qilin", "dpo_zero2", "medcare", "medcare_layer", "cpoly_layer", "sft_7b")


def test_gpu_check_script_parses_and_refuses_unknown_arguments():
    assert subprocess.run(["bash", "-n", str(GPU_CHECK)], capture_output=True, text=True).returncode == 0
    r = subprocess.run(["bash", str(GPU_CHECK), "--bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("usage: bash bench/gpu_check.sh [--dry-run]")


@pytest.mark.slow
def test_gpu_check_dry_run_prints_every_step_and_checks_what_a_cpu_can(tmp_path):
    import os
    import sys

    env = dict(os.environ, OUT=str(tmp_path / "out"), PY=sys.executable)
    env.pop("WHEELS", None)
    r = subprocess.run(["bash", str(GPU_CHECK), "--dry-run"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    for step in STEPS:
        assert f"gpu_check: step {step} (limit " in out
    assert "bench/gpu_7b_sft.py --out" in out and "gpu_7b_sft: qwen1.5-7b: 7.72B parameters; 64 x 512 tokens" in out
    assert "launcher=deepspeed launcher.num_gpus=1" in out and "deepspeed --num_gpus 1 --num_nodes 1" in out
    assert "--device cuda --dtype bf16 --tokens 4096" in out
    summary = (tmp_path / "out" / "gpu_check_summary.md").read_text()
    assert summary.startswith("# bench/gpu_check.sh summary (dry run: nothing ran on a GPU)")
    rows = [json.loads(l) for l in (tmp_path / "out" / "gpu_check.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(STEPS) and {row["status"] for row in rows} == {"dry-run"}
    assert not (tmp_path / "out" / "runs").exists()  # nothing trained
