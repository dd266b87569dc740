"""Every bundled recipe's eval stages run end to end on the tiny model through the stage entry
point (the stage file a launcher runs), with the recipe's own params and data (data=sample, the
tiny profile): each produces the sets its paper's tables need; a judge stage without `judge.url`
is skipped with its one line and records nothing; with a judge, the pairwise stage judges after
against before and records win / tie / lose and both response lengths."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from _evalrun import tiny_artifact
from medpipe.compose import bind_stages, bundled_recipes, compose

MCQ = ("acc", "f1_weighted")
GEN = ("bleu1", "bleu4", "rouge1", "rouge2", "rougeL")
HELD = {"text": "heldout_text/ppl", "chat": "heldout_chat/loss", "preference": "heldout_pref/acc"}
# the metrics each eval stage must record on the bundled samples (sets named as the papers' tables)
EXPECTED = {
    "qilin": {"cmexam_*": ["cmexam/acc", "cmexam/f1_weighted", "cmexam/expl_bleu1", "cmexam/expl_rougeL"],
              "ceval_*": ["ceval/acc"],
              "huatuo_*": [f"huatuo26m_test/{m}" for m in GEN] + list(HELD.values()),
              "eval": [f"huatuo26m_test/{m}" for m in GEN] + list(HELD.values())},
    "medcare": {"exams_*": [f"{s}/acc" for s in ("medqa_mainland", "mmedbench_zh", "cmb", "cmexam", "cmmlu", "ceval",
                                                 "ple_pharmacy", "ple_tcm", "medqa_us", "medmcqa", "mmlu_medical",
                                                 "cmmlu_med", "ceval_med", "mmlu_med")] + ["heldout_chat/loss"],
                "cblue_*": ["promptcblue/score", "promptcblue/KUAKE-QIC_macro_f1", "promptcblue/KUAKE-QQR_f1",
                            "promptcblue/CMeEE-V2_micro_f1", "promptcblue/MedDG_rougeL"],
                "ccte_*": None},  # None: a judge stage, skipped without judge.url
    "iimedgpt": {"base_eval": [f"{s}/{m}" for s in ("huatuo26m_test", "cmtmedqa_test") for m in GEN]
                 + ["heldout_chat/loss", "heldout_pref/acc", "heldout_pref/margin"],
                 "eval_*": [f"{s}/bleu1" for s in ("huatuo26m_test", "cmtmedqa_test")],
                 "dpo_vs_sft": None},
    "antglm": {"*": ["pubmedqa/acc"]},
    "med_rlvr": {"exam_*": ["medqa/acc", "medmcqa/acc"]},   # the same exam before SFT, before and after RL
}


def expected(recipe: str, stage: str):
    from fnmatch import fnmatchcase

    return next(v for pat, v in EXPECTED[recipe].items() if fnmatchcase(stage, pat))


def run_eval_stage(cfg, plan, out: Path, art=None):
    from omegaconf import OmegaConf

    from medpipe.entry import run_stage_file

    art = art or dataclasses.replace(tiny_artifact(), stage=plan.source or "base")
    out.mkdir(parents=True)
    spec = {"name": plan.name, "kind": plan.kind, "index": plan.index, "total": 1, "params": plan.raw,
            "input": dataclasses.asdict(art), "output_dir": str(out),
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "data": OmegaConf.to_container(cfg.data, resolve=True), "seed": 0, "launcher": {"name": "local"},
            "config_hash": "t", "inputs_hash": "t"}
    (out / "stage.json").write_text(json.dumps(spec))
    return run_stage_file(out / "stage.json")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", bundled_recipes())
def test_each_eval_stage_of_the_recipe_runs_on_the_tiny_model(recipe, tmp_path, capsys):
    cfg, _ = compose(recipe)
    plans = [p for p in bind_stages(cfg) if p.kind == "eval"]
    assert plans[0].index == 0 and plans[0].source is None  # the base model is measured first
    for plan in plans:
        result = run_eval_stage(cfg, plan, tmp_path / plan.name)
        want = expected(recipe, plan.name)
        if want is None:
            line = (f"skipped: no judge endpoint configured (set stages.{plan.name}.judge.url=http://HOST:PORT/v1 "
                    f"to score {'after vs before' if plan.params.pairwise else 'with'} "
                    f"judge.template={plan.params.judge.template})")
            assert not [k for k in result.metrics if "/" in k] and result.handoff == {"skipped": line}, plan.name
            assert line in capsys.readouterr().out
            continue
        missing = [m for m in want if m not in result.metrics]
        assert not missing, (plan.name, missing, sorted(result.metrics))
        assert result.evaluated_stage == (plan.source or "base")
        if plan.params.protocol == "native" and plan.params.method == "cue":  # a random model still answers
            assert all(r["invalid"] == 0 for s, r in result.results.items()
                       if r.get("kind") == "mcq"), plan.name


class ScriptedJudge:
    """A judge that prefers the first answer shown: every pair is inconsistent → tie, except when
    both answers are equal (then 'Tie' both ways)."""
    model, base = "scripted", "http://judge"

    def __init__(self):
        self.calls = 0

    def chat(self, messages, max_tokens=16, temperature=0.0):
        self.calls += 1
        return "Win"


@pytest.mark.slow
def test_the_pairwise_stage_judges_after_against_before(tmp_path, monkeypatch):
    from medpipe.stages.evaluation import judge

    judge_client = ScriptedJudge()
    monkeypatch.setattr(judge, "judge_client", lambda params: judge_client)
    cfg, _ = compose("iimedgpt", ["stages.dpo_vs_sft.judge.url=http://judge/v1", "stages.dpo_vs_sft.limit=3"])
    plan = next(p for p in bind_stages(cfg) if p.name == "dpo_vs_sft")
    tiny = tiny_artifact()
    after = dataclasses.replace(tiny, stage="dpo", base_model_path=tiny.model_path)
    result = run_eval_stage(cfg, plan, tmp_path / "pairwise", art=after)
    m = result.metrics
    # "Win" in both orders contradicts itself: every pair is a tie, counted inconsistent
    for s in ("huatuo26m_test_pairwise", "cmtmedqa_test_pairwise"):
        assert (m[f"{s}/win"], m[f"{s}/tie"], m[f"{s}/lose"], m[f"{s}/malformed"]) == (0.0, 1.0, 0.0, 0)
        assert m[f"{s}/len_after"] == m[f"{s}/len_before"]  # the same model on both sides here
        assert result.results[s]["line"].startswith("dpo vs before: 0 % win, 100 % tie, 0 % lose (3 judged")
    assert judge_client.calls == 2 * 3 * 2  # two sets, three items, both orders


@pytest.mark.parametrize("recipe", bundled_recipes())
def test_the_base_model_is_measured_first_and_trained_from_directly(recipe):
    """The first stage evaluates the recipe's model; the first training stage reads that model
    itself (`from: base`), so an eval's parameters never change what trains after it."""
    cfg, _ = compose(recipe)
    plans = bind_stages(cfg)
    assert plans[0].kind == "eval" and plans[0].source is None
    first_training = next(p for p in plans if p.kind != "eval")
    assert first_training.source is None
    evals_of_base = [p.name for p in plans if p.kind == "eval" and p.source is None]
    later = {p.source for p in plans if p.kind != "eval" and p.source is not None}
    assert not later & {p.name for p in plans if p.kind == "eval"}, "a training stage reads an eval's pass-through"
    assert evals_of_base  # the before of every later number
