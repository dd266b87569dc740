"""Composition and binding: Hydra grammar, strict params, clear errors, light imports."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from medpipe.compose import bind_stages, compose
from medpipe.errors import ConfigError


def plans(recipe="qilin", *overrides):
    cfg, choices = compose(recipe, list(overrides))
    return cfg, choices, bind_stages(cfg)


def test_overrides_reach_the_typed_params():
    cfg, _, ps = plans("qilin", "stages.sft.lr=1e-4", "stages.cpt.epochs=1", "stages.dpo.adam_beta2=0.95")
    by = {p.name: p for p in ps}
    assert [p.name for p in ps] == ["cmexam_base", "ceval_base", "huatuo_base", "cpt", "cmexam_cpt", "ceval_cpt", "huatuo_cpt",
                                    "sft", "cmexam_sft", "ceval_sft", "huatuo_sft", "dpo", "eval"]
    assert [(p.name, p.source) for p in ps if p.kind != "eval"] == [("cpt", None), ("sft", "cpt"), ("dpo", "sft")]
    assert by["sft"].params.lr == 1e-4 and isinstance(by["sft"].params.lr, float)
    assert by["cpt"].params.epochs == 1.0
    assert by["dpo"].params.adam_beta2 == 0.95  # a default not written in the recipe is overridable
    assert by["sft"].params.peft.r == 8 and by["sft"].params.peft.alpha == 32  # paper values survive the profile


def test_tiny_profile_is_applied_and_named():
    cfg, choices, ps = plans("qilin")
    assert choices["profile@_global_"] == "qilin_tiny"
    assert {p.name: p for p in ps}["cpt"].params.block_size == 128
    # a real model gets the paper's values (no profile file for it)
    cfg, choices, ps = plans("qilin", "model=qwen1.5-7b", "model.path=/models/q")
    assert {p.name: p for p in ps}["cpt"].params.block_size == 1024
    assert cfg.model.path == "/models/q" and cfg.model.trust_remote_code is False


def test_drop_a_stage_and_add_a_param_with_hydra_grammar():
    _, _, ps = plans("qilin", "~stages.dpo", "~stages.eval", "~stages.cmexam_cpt", "~stages.ceval_cpt",
                     "~stages.cmexam_sft", "~stages.ceval_sft", "~stages.cmexam_base", "~stages.ceval_base",
                     "~stages.huatuo_base", "~stages.huatuo_cpt", "~stages.huatuo_sft")
    assert [p.name for p in ps] == ["cpt", "sft"]
    _, _, ps = plans("qilin", "+stages.sft.scheduler_kwargs.min_lr_rate=0.1")
    assert {p.name: p for p in ps}["sft"].params.scheduler_kwargs == {"min_lr_rate": 0.1}


@pytest.mark.parametrize("override, needle", [
    ("stages.sft.lrr=1", "unknown key 'stages.sft.lrr'"),
    ("stages.sft.lr=abc", "stages.sft.lr"),
    ("+stages.sft.foo=1", "stages.sft: unknown parameter 'foo'. Allowed: data, lr"),
    ("stages.sft.peft.rank=4", "unknown key 'stages.sft.peft.rank'"),
    ("+stages.sft.peft.rank=4", "stages.sft.peft.rank: unknown parameter. Allowed: type, r, alpha, dropout, target_modules"),
    ("model=nope", "available model options: baichuan-7b"),
    ("stages.sft.from=dpo", "stages.sft.from: 'dpo' is not an earlier stage (earlier stages: cmexam_base, ceval_base, huatuo_base, cpt, "
     "cmexam_cpt, ceval_cpt, huatuo_cpt)"),
    ("stages.cpt.kind=nokind", "unknown stage kind 'nokind'. Available kinds: "),
    # values of the right type but impossible: every bad field named, before anything trains
    ("stages.sft.lr=-1", "stages.sft: lr must be > 0, got -1.0"),
    ("stages.dpo.beta=0", "stages.dpo: beta must be > 0, got 0.0"),
    ("stages.cpt.block_size=0", "stages.cpt: block_size must be >= 1, got 0"),
    ("stages.sft.peft.dropout=1", "stages.sft: peft.dropout must be in [0, 1), got 1.0"),
    ("stages.sft.spike_guard.lr_factor=2", "stages.sft: spike_guard.lr_factor must be in (0, 1], got 2.0"),
    ("stages.sft.precision=fp8", "precision must be one of auto, bf16, fp16, fp32, got 'fp8'"),
    ("stages.sft.micro_batch_size=0", "stages.sft: micro_batch_size must be between 1 and batch_size (8), or null, got 0"),
    ("stages.sft.spike_guard.mode=halve", "stages.sft: spike_guard.mode must be one of skip, halve_loss, got 'halve'"),
    ("stages.dpo.max_prompt_length=0", "stages.dpo: max_prompt_length must be >= 1 or null, got 0"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        plans("qilin", override)
    assert needle in str(e.value)


def test_unknown_recipe_lists_the_available_ones():
    with pytest.raises(ConfigError, match=r"unknown recipe 'nope'. Available recipes: .*qilin"):
        compose("nope")


def test_user_recipe_file_reuses_conf_groups(tmp_path):
    recipe = tmp_path / "my_recipe.yaml"
    recipe.write_text(textwrap.dedent("""
        defaults: [base, model: tiny, data: sample, stage/sft@stages.sft, _self_]
        name: mine
        stages:
          sft: {data: "${data.dialogue}", lr: 1e-3, peft: {r: 4, alpha: 8}}
    """))
    cfg, _, ps = plans(str(recipe), "stages.sft.epochs=2")
    assert cfg.name == "mine" and ps[0].kind == "sft" and ps[0].params.peft.r == 4 and ps[0].params.epochs == 2
    assert ps[0].params.data["format"] == "sharegpt"


def test_real_model_without_path_is_one_clear_error():
    from medpipe.plan import base_identity

    cfg, _ = compose("qilin", ["model=qwen1.5-7b"])
    with pytest.raises(ConfigError, match="model.path is required for model=qwen1.5-7b"):
        base_identity(cfg)


def _imports_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('@@MODULES@@', ' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split("@@MODULES@@")[-1].split())  # only the module list, not the command's output


def test_help_and_show_import_no_torch():
    help_mods = _imports_after("from medpipe.commands.cli import app\ntry:\n    app(['--help'])\nexcept SystemExit: pass")
    show_mods = _imports_after("from medpipe.commands.cli import app\ntry:\n    app(['show', 'recipe=qilin'])\nexcept SystemExit: pass")
    for mods in (help_mods, show_mods):
        assert not {"torch", "transformers", "trl", "peft", "datasets"} & mods


@pytest.fixture
def echo_kind(monkeypatch):
    """tests/plugins/plugin_stage.py's kind, registered as a plugin package would register it."""
    from medpipe import registry

    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent / "plugins"))
    from plugin_stage import EchoStage

    registry.register("echo", EchoStage)
    yield EchoStage
    registry.unregister("echo")


def test_a_third_party_stage_kind_plugs_in_without_an_engine_change(echo_kind):
    import dataclasses

    from medpipe import registry

    assert "echo" in registry.kinds() and registry.load("echo") is echo_kind
    cfg, _ = compose("qilin", ["+stages.echo={kind: echo, message: hi}"])
    echo = bind_stages(cfg)[-1]
    assert echo.kind == "echo" and echo.params.message == "hi" and echo.source == "eval"
    assert dataclasses.asdict(echo.params) == {"message": "hi", "times": 1}
    with pytest.raises(ConfigError, match="stages.echo: unknown parameter 'loud'"):
        bind_stages(compose("qilin", ["+stages.echo={kind: echo, loud: true}"])[0])



def test_a_kind_must_subclass_stagekind():
    from dataclasses import dataclass

    from medpipe import registry

    @dataclass
    class P:
        x: int = 1

    class Duck:  # Params and run, but not the contract's class
        Params = P

        def run(self, ctx):
            return ctx.input

    with pytest.raises(ConfigError) as e:
        registry.register("duck", Duck)
    assert str(e.value) == (f"stage kind 'duck' ({Duck.__module__}:{Duck.__qualname__}) must subclass "
                            "medpipe.stagekind.StageKind and define a Params dataclass")
    assert "duck" not in registry.kinds()


def test_from_only_and_force_select_the_stages_to_retrain():
    from medpipe.run import Pipeline

    cfg, _, ps = plans("qilin")
    pipe = Pipeline(cfg, ps, "qilin", console=None)
    assert pipe.selected(False, None, None) == set()
    assert pipe.selected(False, "dpo", None) == {"dpo", "eval"}
    assert pipe.selected(False, None, "sft") == {"sft"}
    assert pipe.selected(True, None, None) == {p.name for p in ps}
    with pytest.raises(ConfigError, match="--from nope: no such stage"):
        pipe.selected(False, "nope", None)


# -- global batch: batch_size is the papers' global figure, accumulation from the world size --------
def test_batch_layout_from_the_world_size():
    from medpipe.stages.training.params import TrainParams

    assert TrainParams(batch_size=512, micro_batch_size=64).batch_layout(8) == (64, 1)
    assert TrainParams(batch_size=512, micro_batch_size=64).batch_layout(1) == (64, 8)
    assert TrainParams(batch_size=128, micro_batch_size=4).batch_layout(8) == (4, 4)
    assert TrainParams(batch_size=8).batch_layout(2) == (4, 1)  # no micro batch: split over the ranks
    with pytest.raises(ValueError, match=r"batch_size 32 \(global\) is not micro_batch_size 8 × 8 rank\(s\) × a whole "
                                         r"number of accumulation steps; choose batch_size a multiple of 64"):
        TrainParams(batch_size=32, micro_batch_size=8).batch_layout(8)
    with pytest.raises(ValueError, match=r"batch_size 12 \(global\) does not divide over 8 ranks"):
        TrainParams(batch_size=12).batch_layout(8)


# the papers' global batches (issue 16 / notes: Qilin §4.2, MedCare App. B.1, AntGLM §3.4.1-2 and §4.1;
# IIMedGPT states none), as `medpipe show` makes them on 8 GPUs
PAPER_BATCHES = {
    "qilin": {"cpt": "global batch 8 = 1 per device × 1 accumulation × 8 rank(s)",
              "sft": "global batch 512 = 64 per device × 1 accumulation × 8 rank(s)",
              "dpo": "global batch 32 = 4 per device × 1 accumulation × 8 rank(s)"},
    "medcare": {"mka": "global batch 128 = 4 per device × 4 accumulation × 8 rank(s)",
                "da": "global batch 128 = 4 per device × 4 accumulation × 8 rank(s)"},
    "antglm": {"cpt": "global batch 256 = 4 per device × 8 accumulation × 8 rank(s)",
               "sft": "global batch 360 = 9 per device × 5 accumulation × 8 rank(s)",
               "cpoly": "global batch 12 CANNOT run on this launcher: batch_size 12 (global) does not divide over 8 ranks"},
    "iimedgpt": {"sft": "global batch 32 = 2 per device × 2 accumulation × 8 rank(s)",
                 "dpo": "global batch 32 = 2 per device × 2 accumulation × 8 rank(s)"},
}


@pytest.mark.parametrize("recipe", sorted(PAPER_BATCHES))
def test_show_prints_the_papers_global_batch_of_every_training_stage(recipe):
    from conftest import medpipe

    r = medpipe("show", f"recipe={recipe}", "model=qwen1.5-7b", "model.path=/models/q", "launcher=deepspeed",
                "launcher.num_gpus=8")
    assert r.code == 0, r.out
    lines = r.out.splitlines()
    for stage, want in PAPER_BATCHES[recipe].items():
        at = next(i for i, line in enumerate(lines) if line.startswith("#  ") and f"-{stage} [" in line)
        assert lines[at + 1].startswith(f"#     batch: {want}"), (stage, lines[at:at + 2])


def test_run_refuses_a_batch_that_does_not_divide_before_training(tmp_path):
    from conftest import medpipe

    r = medpipe("run", "recipe=qilin", f"run.root={tmp_path}/runs", "launcher=torchrun", "launcher.num_gpus=3")
    assert r.code == 2 and r.out.strip().splitlines()[-1] == (
        "medpipe: error: stages.cpt: batch_size 8 (global) does not divide over 3 ranks; set batch_size to a "
        "multiple of 3 (or set micro_batch_size)"), r.out
    assert not (tmp_path / "runs" / ".store").exists() or not list((tmp_path / "runs" / ".store").glob("*/artifact.json"))


def test_list_params_prints_each_default_with_its_help():
    from conftest import medpipe

    r = medpipe("list", "--params", "medcare_da")
    assert r.code == 0, r.out
    lines = [" ".join(x.split()) for x in r.out.splitlines()]
    assert lines[0] == "medcare_da:"
    assert "lr=0.0002 peak learning rate" in lines
    assert "batch_size=4 GLOBAL batch: samples per optimizer step over all ranks (the papers' figure)" in lines
    assert "orth_lambda=1.0 λ of the orthogonal loss λ·Σ|A_KA A_Alignᵀ| (0 = the ablation without it)" in lines
    assert "medcare.variant='code' " + "code: the authors' code (α/r for every LoRA, top-K gates renormalised, " \
        "Kaiming A) | paper: Eq. 4/5/13 (α/r for NA, α/r' for KA and Align, softmax gates not renormalised, " \
        "Gaussian A) [choices: code | paper]" in lines
    assert "spike_guard.mode='skip' skip (drop the update) | halve_loss (IIMedGPT: apply it with the loss halved) " \
        "[choices: skip | halve_loss]" in lines
    # a default the kind changes (changed_defaults) keeps the base field's help and place
    assert "epochs=3.0 passes over the data" in lines and "warmup=0.03 < 1: fraction of the total steps; >= 1: steps" in lines
    every = medpipe("list", "--params")
    kinds = [x[:-1] for x in every.out.splitlines() if x and not x.startswith(" ")]
    assert kinds == ["cpo", "cpoly", "cpt", "dpo", "eval", "grpo", "kto", "medcare_da", "medcare_mka", "orpo", "sft",
                     "voc_label"]
    bad = medpipe("list", "--params", "nope")
    assert bad.code == 2 and "unknown stage kind 'nope'" in bad.out


@pytest.mark.parametrize("kind, field, choices", [
    ("eval", "protocol", "native | lm-eval | opencompass | medcare | cmexam"),
    ("eval", "method", "ppl | cue | generate | generate_then_cue"),
    ("sft", "precision", "auto | bf16 | fp16 | fp32"),
    ("sft", "overlength", "truncate | drop | error | null"),
    ("dpo", "loss_type", "sigmoid | hinge | ipo | exo_pair | nca_pair | robust | bco_pair | sppo_hard | aot | "
                         "aot_unpaired | apo_zero | apo_down | discopop | sft | sigmoid_norm"),
    ("dpo", "truncation_mode", "keep_start | keep_end"),
])
def test_list_shows_the_allowed_values_and_a_bad_value_names_them(kind, field, choices):
    """One declaration (`param(..., choices=...)`) gives `medpipe list`, `list --params` and the check."""
    from conftest import medpipe

    import re

    out = medpipe("list").out.splitlines()
    row = out[next(i for i, x in enumerate(out) if x.startswith(f"  {kind}: ")) + 1]  # the kind's parameters
    assert re.search(rf"(^|, ){field}=\S+ \[choices: {re.escape(choices)}\](,|$)", row.strip()), row
    params = medpipe("list", "--params", kind)
    line = next(" ".join(x.split()) for x in params.out.splitlines() if x.strip().startswith(f"{field}="))
    assert line.endswith(f"[choices: {choices}]"), line
    with pytest.raises(ConfigError) as e:
        plans("qilin", f"stages.{kind}.{field}=nope")  # qilin's stages are named after their kinds
    named = choices.replace(" | null", "").replace(" | ", ", ")
    tail = " or null" if "null" in choices else ""
    assert str(e.value) == f"stages.{kind}: {field} must be one of {named}{tail}, got 'nope'"


def test_every_param_of_every_kind_has_help():
    from medpipe import registry
    from medpipe.commands.listing import param_rows

    for kind in registry.kinds():
        missing = [name for name, _, text in param_rows(registry.load(kind).Params) if not text]
        assert not missing, (kind, missing)
