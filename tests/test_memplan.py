"""The per-GPU memory plan (medpipe.memplan): the issue's numbers for the paper recipes on their
real base models (shapes from conf/model/*.yaml or a config.json), DeepSpeed's own estimators for
the model states, and the one-line refusals of `validate` / `run`. No training here; the estimate
against measured peaks is bench/bench_memplan.py (BENCHMARKS.md)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import medpipe
from medpipe import memplan
from medpipe.compose import bind_stages, compose

GPU8 = ["launcher=deepspeed", "launcher.num_gpus=8"]


@pytest.fixture(autouse=True)
def no_visible_gpu(monkeypatch):
    """The plans below are for the launcher's GPUs (launcher.gpu_memory_gb), wherever the tests run."""
    monkeypatch.setattr(memplan, "device_memory", lambda: None)


def plan(recipe: str, *overrides: str) -> tuple:
    cfg, _ = compose(recipe, list(overrides))
    plans = bind_stages(cfg)
    memories, where = memplan.plan_recipe(cfg, plans)
    return cfg, plans, {m.stage: m for m in memories}


def model_dir(tmp_path: Path, name: str) -> Path:
    """A checkpoint dir holding only the config.json of a published model (its shape block)."""
    d = tmp_path / name
    d.mkdir()
    shape = OmegaConf.to_container(OmegaConf.load(Path(memplan.__file__).parent.parent / "conf/model" / f"{name}.yaml").shape)
    (d / "config.json").write_text(json.dumps(shape))
    return d


@pytest.mark.parametrize("name,params", [("baichuan-7b", 7.00e9), ("llama2-7b", 6.74e9), ("qwen1.5-7b", 7.72e9),
                                         ("qwen1.5-14b", 14.17e9), ("qwen-14b", 14.17e9), ("qwen1.5-1.8b", 1.84e9),
                                         ("smollm2-135m", 134.5e6)])
def test_parameter_counts_from_the_model_configs(name, params):
    cfg, _ = compose("qilin", [f"model={name}"])
    shape, where = memplan.model_shape(OmegaConf.to_container(cfg.model, resolve=True))
    assert where == f"model.shape ({name})"
    assert shape.params == pytest.approx(params, rel=0.01)


def test_the_tiny_models_count_is_its_real_parameter_count():
    from transformers import AutoModelForCausalLM

    cfg, _ = compose("qilin", [])
    shape, where = memplan.model_shape(OmegaConf.to_container(cfg.model, resolve=True))
    real = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(Path(where).parent)).parameters())
    assert shape.params == pytest.approx(real, rel=0.01)  # q/k/v biases (Qwen2) are the only difference


def test_model_states_are_deepspeeds_own_estimates():
    """Full training, bf16: weights + gradients + optimizer = DeepSpeed's estimate_zero{2,3}_model_states_mem_needs."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    for ds, estimate in (("zero2", lambda s: estimate_zero2_model_states_mem_needs(s.params, 8, cpu_offload=False)[1]),
                         ("zero3", lambda s: estimate_zero3_model_states_mem_needs(
                             s.params, s.largest_layer, 8, cpu_offload=False)[1])):
        cfg, plans, m = plan("antglm", "model=qwen1.5-7b", *GPU8, f"deepspeed={ds}")
        shape, _ = memplan.model_shape(OmegaConf.to_container(cfg.model, resolve=True))
        states = m["cpt"].parts["weights"] + m["cpt"].parts["gradients"] + m["cpt"].parts["optimizer"]
        assert states == pytest.approx(estimate(shape), rel=1e-6), ds


def test_qilin_sft_on_a_7b_needs_hundreds_of_gb_without_checkpointing_and_fits_with_it():
    # §4.2: 64 conversations × 512 tokens per device on Baichuan-7B (8 × A100 80G)
    cfg, plans, m = plan("qilin", "model=baichuan-7b", *GPU8, "stages.sft.gradient_checkpointing=false")
    sft = m["sft"]
    assert sft.tokens == 64 * 512
    assert 150e9 <= sft.parts["activations"] <= 350e9  # the issue: ~150-300 GB for a 7B without checkpointing
    assert sft.total > 80e9 * 3
    problem = memplan.refusal(cfg, plans)
    assert problem.startswith("stages.sft: needs ~")
    assert problem.endswith("set stages.sft.gradient_checkpointing=true (~56 GB)")
    cfg, plans, m = plan("qilin", "model=baichuan-7b", *GPU8)  # the recipe turns checkpointing on for real models
    assert m["sft"].checkpointing and m["sft"].total < 80e9
    assert memplan.refusal(cfg, plans) is None


def test_medcare_on_qwen15_7b_carries_19_gb_of_logits():
    # App. B.1: 3072 tokens, 4 per device; a 151,936-token vocabulary: 2 + 4 + 4 bytes per logit
    _, _, m = plan("medcare", "model=qwen1.5-7b", *GPU8)
    for stage in ("mka", "da"):
        assert m[stage].tokens == 4 * 3072
        assert m[stage].parts["logits"] == pytest.approx(4 * 3072 * 151936 * 10)
        assert m[stage].parts["logits"] / 1e9 == pytest.approx(18.7, abs=0.1)


def test_iimedgpt_on_qwen_14b_on_four_gpus():
    # the paper: one node of 4 A100-80G; 2 × 4096 tokens per device (medpipe's micro batch)
    cfg, plans, m = plan("iimedgpt", "model=qwen-14b", "launcher=deepspeed", "launcher.num_gpus=4",
                         "stages.sft.gradient_checkpointing=false", "stages.dpo.gradient_checkpointing=false")
    assert m["sft"].total > 100e9 and m["dpo"].total > m["sft"].total  # DPO: chosen + rejected
    assert m["dpo"].tokens == 2 * 4096 * 2
    assert memplan.refusal(cfg, plans) == (
        f"stages.sft: needs ~{m['sft'].total / 1e9:.0f} GB per GPU (activations {m['sft'].parts['activations'] / 1e9:.0f}, "
        f"logits {m['sft'].parts['logits'] / 1e9:.0f}, weights+grads+optimizer 28), the GPU has 80 GB "
        f"(launcher.gpu_memory_gb=80); set stages.sft.gradient_checkpointing=true (~49 GB)")
    cfg, plans, m = plan("iimedgpt", "model=qwen-14b", "launcher=deepspeed", "launcher.num_gpus=4",
                         "stages.sft.gradient_checkpointing=true", "stages.dpo.gradient_checkpointing=true")
    assert memplan.refusal(cfg, plans) is None and max(x.total for x in m.values()) < 80e9


def test_a_smaller_micro_batch_is_named_when_checkpointing_is_not_enough():
    cfg, plans, _ = plan("qilin", "model=baichuan-7b", *GPU8, "stages.sft.gradient_checkpointing=true",
                         "launcher.gpu_memory_gb=40")
    assert memplan.refusal(cfg, plans).endswith("set stages.sft.micro_batch_size=32 (~35 GB)")


def test_full_dpo_holds_a_reference_model_and_lora_dpo_none():
    _, _, full = plan("qilin", "model=baichuan-7b", *GPU8, "~stages.dpo.peft")
    _, _, lora = plan("qilin", "model=baichuan-7b", *GPU8)
    assert full["dpo"].parts["reference model"] == pytest.approx(7.0e9 * 2, rel=0.01)
    assert "reference model" not in lora["dpo"].parts


def test_a_cpu_only_local_run_is_planned_but_never_refused():
    cfg, plans, m = plan("qilin", "model=baichuan-7b")
    assert m["sft"].total > 80e9 and "fp32" in m["sft"].what
    assert memplan.refusal(cfg, plans) is None


def test_the_visible_gpu_wins_over_the_configured_size(monkeypatch):
    monkeypatch.setattr(memplan, "device_memory", lambda: 40e9)
    cfg, plans, _ = plan("qilin", "model=baichuan-7b", "stages.sft.gradient_checkpointing=true")
    assert "the GPU has 40 GB (this machine's GPU)" in memplan.refusal(cfg, plans)


def test_validate_refuses_with_one_line_naming_the_stage_and_the_knob(tmp_path):
    d = model_dir(tmp_path, "baichuan-7b")
    r = medpipe("validate", "recipe=qilin", "model=baichuan-7b", f"model.path={d}", f"run.root={tmp_path}/runs", *GPU8,
                "stages.sft.gradient_checkpointing=false")
    assert r.code == 2
    errors = [line for line in r.out.splitlines() if line.startswith("medpipe: error:")]
    assert len(errors) == 1 and errors[0].startswith("medpipe: error: stages.sft: needs ~")
    assert errors[0].endswith("set stages.sft.gradient_checkpointing=true (~56 GB)")
    assert "sft [sft] 353" in r.out  # the plan was printed first
    assert "Traceback" not in r.out and not (tmp_path / "runs").exists()


def test_run_refuses_before_anything_is_written(tmp_path):
    d = model_dir(tmp_path, "baichuan-7b")
    r = medpipe("run", "recipe=qilin", "model=baichuan-7b", f"model.path={d}", f"run.root={tmp_path}/runs", *GPU8,
               "stages.sft.gradient_checkpointing=false")
    assert r.code == 2 and "medpipe: error: stages.sft: needs ~" in r.out
    assert "stages.sft.gradient_checkpointing=true" in r.out and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("recipe,stage,kind", [("medcare", "mka", "medcare_mka"), ("antglm", "cpoly", "cpoly")])
@pytest.mark.parametrize("ds", ["zero3", "zero3_offload"])
def test_kinds_that_need_whole_weights_refuse_zero3_in_validate(tmp_path, recipe, stage, kind, ds):
    r = medpipe("validate", f"recipe={recipe}", "launcher=deepspeed", "launcher.num_gpus=2", f"deepspeed={ds}")
    assert r.code == 2
    error = [line for line in r.out.splitlines() if line.startswith("medpipe: error:")]
    assert error == [f"medpipe: error: stages.{stage}: kind {kind} cannot run under DeepSpeed ZeRO-3 "
                     f"({memplan_reason(kind)}); use deepspeed=zero2"]


def test_cpt_sft_and_dpo_pass_validate_under_zero3(tmp_path):
    # qilin: full CPT, LoRA SFT, LoRA DPO; iimedgpt's DPO made full-parameter (a partitioned reference)
    for recipe, extra in (("qilin", []), ("iimedgpt", ["stages.dpo.peft=null"])):
        r = medpipe("validate", f"recipe={recipe}", "launcher=deepspeed", "launcher.num_gpus=2", "deepspeed=zero3",
                    f"run.root={tmp_path}/runs", *extra)
        assert r.code == 0, r.out
        assert "ZeRO-3" in r.out and "cannot run under DeepSpeed ZeRO-3" not in r.out


def memplan_reason(kind: str) -> str:
    from medpipe import registry

    return registry.load(kind).refuses_zero3


def test_show_prints_the_plan_of_every_training_stage():
    r = medpipe("show", "recipe=qilin")
    plan_lines = [line for line in r.out.splitlines() if line.startswith("#  ") and "GB =" in line]
    assert [line.split()[1:3] for line in plan_lines] == [["cpt", "[cpt]"], ["sft", "[sft]"], ["dpo", "[dpo]"]]
    assert all("weights" in line and "activations" in line and "logits" in line and "host RAM at load" in line
               for line in plan_lines)
    assert "# memory plan per CPU process (one, fp32)" in r.out and "REFUSED" not in r.out


def test_show_under_zero3_names_the_refusal():
    r = medpipe("show", "recipe=medcare", "launcher=deepspeed", "launcher.num_gpus=2", "deepspeed=zero3")
    assert r.code == 0
    assert "#  REFUSED by validate/run: stages.mka: kind medcare_mka cannot run under DeepSpeed ZeRO-3" in r.out


def test_model_states_that_cannot_fit_name_zero3():
    # full-parameter CPT of Qwen1.5-14B on 2 GPUs under ZeRO-2: 28 GB of 16-bit weights + 18 bytes per
    # parameter over 2 ranks (127 GB) whatever the micro batch
    cfg, plans, m = plan("antglm", "model=qwen1.5-14b", "launcher=deepspeed", "launcher.num_gpus=2")
    assert memplan.refusal(cfg, plans).endswith(
        "even micro_batch_size=1 with checkpointing does not fit: use deepspeed=zero3 (or zero3_offload)")
    cfg, plans, m = plan("antglm", "model=qwen1.5-14b", "launcher=deepspeed", "launcher.num_gpus=2",
                         "deepspeed=zero3_offload", "stages.cpt.gradient_checkpointing=true",
                         "stages.sft.gradient_checkpointing=true", "stages.sft.micro_batch_size=1")
    assert m["cpt"].parts["optimizer"] == 0 and m["cpt"].parts["weights"] == 4 * 152064 * 5120  # only the gather buffer
    assert m["cpt"].host > 14e9 * 16  # the offloaded fp32 states live in host RAM
