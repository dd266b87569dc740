"""Stages under the real DeepSpeed launcher: 2 CPU processes (gloo), ZeRO-2, same code path as a
GPU cluster; and the launch commands/configs generated for clusters."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import medpipe, run_on_two_ranks, zero2_stage, read_artifact
from medpipe.compose import compose
from medpipe.launch import command, deepspeed_config

RECIPE = """
defaults: [base, model: tiny, data: sample, stage/sft@stages.sft, stage/dpo@stages.dpo, _self_]
name: ds
stages:
  sft: {data: "${data.dialogue}", lr: 5e-3, max_steps: 4, logging_steps: 1, batch_size: 4, max_length: 128, peft: {r: 4, alpha: 8}}
  dpo: {data: "${data.preference}", lr: 5e-4, max_steps: 3, logging_steps: 1, batch_size: 4, max_length: 128, peft: {r: 4, alpha: 8}, reward_eval_pairs: 8}
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_sft_and_dpo_under_deepspeed_zero2_on_two_processes(tmp_path):
    run_dir = run_on_two_ranks(tmp_path, RECIPE, port=29531)
    sft = zero2_stage(run_dir, "01-sft")
    zero2_stage(run_dir, "02-dpo")
    assert sft["metrics"]["last_loss"] < sft["metrics"]["first_loss"]


BATCH = """
defaults: [base, model: tiny, data: sample, stage/sft@stages.sft, _self_]
name: batch
stages:
  sft: {data: "${data.dialogue}", lr: 5e-3, max_steps: 3, logging_steps: 1, batch_size: 4, micro_batch_size: 1,
        max_length: 64, peft: {r: 4, alpha: 8}, save_steps: 50}
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_the_optimizer_sees_the_global_batch_on_one_and_on_two_ranks(tmp_path):
    """batch_size 4 = micro 1 × accumulation 4 × 1 rank = micro 1 × accumulation 2 × 2 ranks: each
    optimizer step consumes 4 samples either way (the epoch advances by 4 / dataset size per step)."""
    import json

    import torch

    recipe = tmp_path / "batch.yaml"
    recipe.write_text(BATCH)
    one_dir = tmp_path / "one" / "main"  # its own store: the 2-rank run has the same stage key (same global batch)
    r = medpipe("run", f"recipe={recipe}", f"run.root={tmp_path}/one", f"run.dir={one_dir}")
    assert r.code == 0, r.out
    two_dir = run_on_two_ranks(tmp_path, BATCH, port=29549)
    seen = {}
    for name, run_dir in (("one", one_dir), ("two", two_dir)):
        sdir = (run_dir / "01-sft").resolve()
        art = read_artifact(sdir)
        args = torch.load(Path(art["model_path"]) / "training_args.bin", weights_only=False)
        epochs = [h["epoch"] for h in map(json.loads, (sdir / "log_history.jsonl").read_text().splitlines())
                  if "loss" in h]
        n = art["metrics"]["conversations"]
        seen[name] = (art["metrics"]["global_batch"], args.per_device_train_batch_size,
                      args.gradient_accumulation_steps, art["metrics"]["world_size"], epochs)
    assert seen["one"] == (4, 1, 4, 1, [pytest.approx(4 * k / n) for k in (1, 2, 3)])
    assert seen["two"] == (4, 1, 2, 2, [pytest.approx(4 * k / n) for k in (1, 2, 3)])


def launcher(**kw) -> dict:
    cfg, _ = compose("qilin", [f"launcher={kw.pop('name')}", *[f"launcher.{k}={v}" for k, v in kw.items()]])
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg.launcher, resolve=True)


def test_deepspeed_commands_for_one_and_two_nodes(tmp_path):
    one = command(launcher(name="deepspeed", num_gpus=8), Path("/s/stage.json"))
    assert one[1:] == ["--num_gpus", "8", "--num_nodes", "1", "--master_port", "29500",
                       "--module", "medpipe.entry", "/s/stage.json"]
    two = command(launcher(name="deepspeed", num_gpus=8, num_nodes=2, hostfile="hosts", master_addr="10.0.0.1"),
                  Path("/s/stage.json"))
    assert two[1:] == ["--num_gpus", "8", "--num_nodes", "2", "--master_port", "29500", "--hostfile", "hosts",
                       "--master_addr", "10.0.0.1", "--module", "medpipe.entry", "/s/stage.json"]


def test_torchrun_and_accelerate_commands(tmp_path):
    t1 = command(launcher(name="torchrun", num_gpus=8), Path("/s/stage.json"))
    assert t1[1:] == ["--nproc_per_node", "8", "--nnodes", "1", "--master_port", "29500", "-m", "medpipe.entry",
                      "/s/stage.json"]
    t2 = command(launcher(name="torchrun", num_gpus=8, num_nodes=2, master_addr="10.0.0.1"), Path("/s/stage.json"))
    assert "--rdzv_endpoint" in t2 and "10.0.0.1:29500" in t2 and t2[t2.index("--nnodes") + 1] == "2"
    a = command(launcher(name="accelerate", num_gpus=8, num_nodes=2, master_addr="10.0.0.1", node_rank=1),
                Path("/s/stage.json"))
    assert a[1:5] == ["launch", "--num_processes", "16", "--num_machines"] and "--use_deepspeed" in a
    assert a[a.index("--machine_rank") + 1] == "1" and a[a.index("--main_process_ip") + 1] == "10.0.0.1"
    plain = command(launcher(name="accelerate", num_gpus=2, deepspeed=False), Path("/s/stage.json"))
    assert "--multi_gpu" in plain  # without it accelerate silently starts ONE process


def test_zero2_config_ties_to_stage_params():
    cfg, _ = compose("qilin", ["deepspeed=zero2_offload"])
    from omegaconf import OmegaConf

    ds = OmegaConf.to_container(cfg.deepspeed, resolve=True)
    out = deepspeed_config(ds, type("P", (), {"precision": "bf16"})())
    assert out["zero_optimization"]["stage"] == 2
    assert out["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert out[key] == "auto"  # filled from the stage's params by transformers
    assert "optimizer" not in out and out["zero_force_ds_cpu_optimizer"] is False  # torch AdamW from transformers
    assert out["bf16"] == {"enabled": "auto"}
    assert deepspeed_config(ds, type("P", (), {"precision": "fp32"})())["bf16"] == {"enabled": False}


def test_show_prints_the_launch_command_per_stage():
    r = medpipe("show", "recipe=qilin", "launcher=deepspeed", "launcher.num_gpus=8")
    lines = [l for l in r.out.splitlines() if "launch:" in l]
    assert len(lines) == 3 and all("deepspeed --num_gpus 8" in l and "--module medpipe.entry" in l for l in lines)


FULL = """
defaults: [base, model: tiny, data: sample, stage/sft@stages.sft, _self_]
name: groups
stages:
  sft: {data: "${data.dialogue}", lr: 1e-3, max_steps: 2, logging_steps: 1, batch_size: 2, max_length: 64,
        weight_decay: 0.1, save_steps: 2}
"""


def _param_groups(obj) -> list[dict] | None:
    """The first `param_groups` list in a saved optimizer state (DeepSpeed nests it)."""
    if isinstance(obj, dict):
        if isinstance(obj.get("param_groups"), list):
            return obj["param_groups"]
        for v in obj.values():
            found = _param_groups(v)
            if found is not None:
                return found
    return None


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_optimizer_has_the_no_decay_groups_of_a_local_run(tmp_path):
    """Full-parameter SFT with weight decay: the local run's AdamW keeps biases and norms at
    weight_decay 0 in a group of their own; under ZeRO-2 on 2 ranks the optimizer is the same
    torch AdamW with the same groups (DeepSpeed's own AdamW took one flat group, all decayed)."""
    import torch

    recipe = tmp_path / "groups.yaml"
    recipe.write_text(FULL)
    local_dir = tmp_path / "local" / "main"
    r = medpipe("run", f"recipe={recipe}", f"run.root={tmp_path}/local", f"run.dir={local_dir}")
    assert r.code == 0, r.out
    two_dir = run_on_two_ranks(tmp_path, FULL, port=29557)
    zero2_stage(two_dir, "01-sft")
    decays = {}
    for name, run_dir, pattern in (("local", local_dir, "optimizer.pt"), ("zero2", two_dir, "**/*optim_states.pt")):
        ckpt = (run_dir / "01-sft").resolve() / "checkpoints" / "checkpoint-2"
        files = sorted(ckpt.glob(pattern))
        assert files, f"{name}: no optimizer state under {ckpt}"
        groups = _param_groups(torch.load(files[0], map_location="cpu", weights_only=False))
        decays[name] = sorted(g["weight_decay"] for g in groups)
    assert decays["local"] == [0.0, 0.1]
    assert decays["zero2"] == decays["local"]
    ds = json.loads(((two_dir / "01-sft").resolve() / "deepspeed.json").read_text())
    assert "optimizer" not in ds


CPT = """
defaults: [base, model: tiny, data: sample, stage/cpt@stages.cpt, _self_]
name: cpt2
stages:
  cpt: {data: {path: "${data.pretrain}", dedup: near}, lr: 1e-3, max_steps: 2, logging_steps: 1, batch_size: 2,
        block_size: 64, peft: {r: 4, alpha: 8}, save_steps: 50}
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_cpt_data_is_prepared_once_per_node(tmp_path):
    """Load, MinHash dedup and packing run on local rank 0 only; rank 1 maps the blocks it packed
    (before, both ranks ran the whole pass at the same time) and both train on the same blocks."""
    run_dir = run_on_two_ranks(tmp_path, CPT, port=29563)
    art = zero2_stage(run_dir, "01-cpt")
    logs = (run_dir / "01-cpt").resolve() / "logs"
    rank0, rank1 = (logs / "rank0.log").read_text(), (logs / "rank1.log").read_text()
    assert f"CPT data prepared on this rank: {art['metrics']['documents']} documents" in rank0
    assert "CPT data prepared" not in rank1 and "CPT data: mapped the blocks local rank 0 prepared" in rank1
