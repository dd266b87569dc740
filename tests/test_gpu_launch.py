"""The GPU launch path (issue 25), as far as CPU can express it: which GPUs a launcher starts
ranks on, the DeepSpeed JSON the driver writes, Slurm resources, precision decided on the ranks."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import medpipe
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
                                               (None, "--num_gpus 4")])
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
