"""DeepSpeed ZeRO-3 (`deepspeed=zero3`, `zero3_offload`) for cpt and sft, full and LoRA (dpo: test_zero3_dpo.py): on 2 CPU
processes (gloo) through the real `deepspeed` launcher, the weights after N steps equal the ZeRO-2
run's within fp32 tolerance, every saved model loads with plain `from_pretrained` (the 16-bit
weights gathered on save), and an interrupted ZeRO-3 stage resumes to the same weights."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import medpipe, ran_on_two_ranks
from medpipe.compose import compose
from medpipe.launch import deepspeed_config

# cpt full → sft LoRA (dpo full and LoRA: tests/test_zero3_dpo.py)
RECIPE = """
defaults: [base, model: tiny, data: sample, stage/cpt@stages.cpt, stage/sft@stages.sft, _self_]
name: z
stages:
  cpt: {data: "${data.pretrain}", block_size: 64, lr: 3e-3, max_steps: 4, save_steps: 2, logging_steps: 1, batch_size: 4}
  sft: {from: cpt, data: "${data.dialogue}", lr: 5e-3, max_steps: 3, logging_steps: 1, batch_size: 4, max_length: 96,
        peft: {r: 4, alpha: 8}}
"""
STAGES = {"01-cpt": "model", "02-sft": "merged"}


def test_zero3_configs_gather_16bit_weights_on_save():
    for name, offload in (("zero3", False), ("zero3_offload", True)):
        cfg, _ = compose("qilin", [f"deepspeed={name}"])
        from omegaconf import OmegaConf

        out = deepspeed_config(OmegaConf.to_container(cfg.deepspeed, resolve=True), type("P", (), {"precision": "bf16"})())
        zero = out["zero_optimization"]
        assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
        assert ("offload_param" in zero and zero["offload_param"]["device"] == "cpu") == offload
        assert ("offload_optimizer" in zero) == offload
        assert out["train_micro_batch_size_per_gpu"] == "auto" and out["bf16"] == {"enabled": "auto"}
        assert "optimizer" not in out  # torch AdamW built by transformers (no FusedAdam JIT build; conf/deepspeed/zero2.yaml)


def _run(tmp: Path, zero: str, port: int) -> Path:
    """The recipe under `deepspeed --num_gpus 2` (2 CPU processes, gloo) with deepspeed=`zero`."""
    recipe = tmp / "z.yaml"
    tmp.mkdir(parents=True, exist_ok=True)
    recipe.write_text(RECIPE)
    root = tmp / zero / "runs"  # its own store: the ZeRO stage is not part of a stage's key (same results)
    run_dir = root / zero
    r = medpipe("run", f"recipe={recipe}", f"run.root={root}", f"run.dir={run_dir}", "launcher=deepspeed",
                "launcher.num_gpus=2", f"launcher.master_port={port}", f"deepspeed={zero}")
    assert r.code == 0, r.out
    return run_dir



def _weights(run_dir: Path, link: str) -> dict:
    from transformers import AutoModelForCausalLM

    sdir = (run_dir / link).resolve()
    model = AutoModelForCausalLM.from_pretrained(str(sdir / STAGES[link]))  # plain from_pretrained
    return {k: v.float() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero")
    return {"zero2": _run(tmp, "zero2", 29561), "zero3": _run(tmp, "zero3", 29571)}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.extended
def test_zero3_weights_equal_zero2s_for_full_cpt_and_lora_sft(runs):
    weights = {}
    for link in STAGES:
        two, three = ran_on_two_ranks(runs["zero2"], link, 2), ran_on_two_ranks(runs["zero3"], link, 3)
        assert three["metrics"]["steps"] == two["metrics"]["steps"] > 0
        a, b = _weights(runs["zero2"], link), _weights(runs["zero3"], link)
        assert a.keys() == b.keys()
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst < 1e-5, f"{link}: max |zero2 - zero3| = {worst}"
        weights[link] = b
    # every stage moved the weights it started from (the runs do not compare untouched copies)
    for link, source in (("02-sft", "01-cpt"),):
        moved = max((weights[link][k] - weights[source][k]).abs().max().item() for k in weights[link])
        assert moved > 1e-4, f"{link} did not move from {source}"
    cpt = json.loads(((runs["zero3"] / "01-cpt").resolve() / "artifact.json").read_text())["metrics"]
    assert cpt["last_loss"] < cpt["first_loss"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.extended
def test_an_interrupted_zero3_stage_resumes_to_the_same_weights(runs, tmp_path):
    """The ZeRO-3 CPT stage (checkpoints at steps 2 and 4) with its step-4 checkpoint and result
    removed and its status interrupted: rerun, it resumes from checkpoint-2 (DeepSpeed's partitioned
    optimizer state) and ends with the uninterrupted run's weights."""
    done = runs["zero3"]
    run_dir = tmp_path / "runs" / "resumed"
    shutil.copytree(done.parent, tmp_path / "runs", symlinks=True, dirs_exist_ok=True)
    shutil.copytree(done, run_dir, symlinks=True)
    sdir = (run_dir / "01-cpt").resolve()
    assert sdir.is_relative_to(tmp_path)  # the copy's store, never the fixture's
    expected = _weights(done, "01-cpt")
    (sdir / "artifact.json").unlink()
    shutil.rmtree(sdir / "checkpoints" / "checkpoint-4")
    status = json.loads((sdir / "status.json").read_text())
    (sdir / "status.json").write_text(json.dumps({**status, "state": "interrupted"}))
    recipe = tmp_path / "z.yaml"
    recipe.write_text(RECIPE)
    r = medpipe("run", f"recipe={recipe}", f"run.root={tmp_path}/runs", f"run.dir={run_dir}", "launcher=deepspeed",
                "launcher.num_gpus=2", "launcher.master_port=29581", "deepspeed=zero3", "--only", "cpt")
    assert r.code == 0, r.out
    art = ran_on_two_ranks(run_dir, "01-cpt", 3)
    assert art["metrics"]["resumed_from"] == "checkpoint-2" and art["metrics"]["steps"] == 4
    got = _weights(run_dir, "01-cpt")
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) < 1e-5
