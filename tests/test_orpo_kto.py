"""`orpo` and `kto` train on the tiny model from medpipe's preference data and hand on like dpo:
the training loss falls (ORPO), the weights move, and the next stage gets this stage's model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import medpipe, read_artifact

pytestmark = pytest.mark.slow


def run(tmp_path: Path, stage: str) -> dict:
    recipe = tmp_path / "p.yaml"
    recipe.write_text("defaults: [base, model: tiny, data: sample, _self_]\nname: p\nstages:\n  " + stage + "\n"
                      "  after: {kind: eval, data: ['${data.medqa}'], limit: 4}\n")
    run_dir = tmp_path / "runs" / "r"
    r = medpipe("run", f"recipe={recipe}", f"run.root={tmp_path}/runs", f"run.dir={run_dir}")
    assert r.code == 0, r.out
    art = read_artifact(next(run_dir.glob("01-*/artifact.json")).parent)
    ev = read_artifact(run_dir / "02-after")
    assert ev["evaluated_stage"] == art["stage"]          # the next stage got this stage's model
    return art


def changed(a_dir: str, b_dir: str) -> bool:
    from safetensors.torch import load_file

    a = {k: v for f in Path(a_dir).glob("*.safetensors") for k, v in load_file(f).items()}
    b = {k: v for f in Path(b_dir).glob("*.safetensors") for k, v in load_file(f).items()}
    return a.keys() == b.keys() and any(not (a[k] == b[k]).all() for k in a)


def test_orpo_trains_reference_free(tmp_path):
    art = run(tmp_path, "orpo: {kind: orpo, data: '${data.preference}', lr: 5e-3, max_steps: 6, batch_size: 4, "
                        "max_length: 128, logging_steps: 1, peft: {r: 4, alpha: 8}}")
    m = art["metrics"]
    assert art["kind"] == "orpo" and art["format"] == "adapter" and m["steps"] == 6
    assert m["last_loss"] < m["first_loss"]
    assert m["pairs"] == 150 and "rewards_accuracies" in m and "log_odds_ratio" in m
    assert changed(art["base_model_path"], art["merged_path"])


def test_kto_trains_on_unpaired_answers(tmp_path):
    art = run(tmp_path, "kto: {kind: kto, data: '${data.preference}', lr: 5e-4, max_steps: 4, batch_size: 4, "
                        "max_length: 128, logging_steps: 1}")
    m = art["metrics"]
    assert art["kind"] == "kto" and art["format"] == "full" and m["steps"] == 4
    assert m["answers"] == 300 and m["desirable"] == 150
    from medpipe.stages.models.tiny import ensure_tiny

    assert changed(str(ensure_tiny()), art["model_path"])


def test_simpo_is_cpo_with_one_parameter(tmp_path):
    art = run(tmp_path, "simpo: {kind: cpo, loss_type: simpo, beta: 2.0, data: '${data.preference}', lr: 5e-3, "
                        "max_steps: 4, batch_size: 4, max_length: 128, logging_steps: 1, peft: {r: 4, alpha: 8}}")
    m = art["metrics"]
    assert art["kind"] == "cpo" and m["cpo_alpha"] == 0.0 and m["steps"] == 4   # pure SimPO: no NLL term
    assert m["last_loss"] < m["first_loss"]
    assert changed(art["base_model_path"], art["merged_path"])


def test_kto_trains_on_labelled_feedback(tmp_path):
    """The bundled feedback sample (format kto: single answers labelled good or bad) trains as is."""
    from medpipe.compose import package_dir

    data = f"{{path: '{package_dir('samples')}/kto_feedback_en.jsonl', format: kto}}"
    art = run(tmp_path, f"kto: {{kind: kto, data: {data}, lr: 5e-4, max_steps: 3, batch_size: 4, "
                        "max_length: 128, logging_steps: 1, peft: {r: 4, alpha: 8}}")
    m = art["metrics"]
    assert art["kind"] == "kto" and m["steps"] == 3
    assert m["answers"] == 64 and m["desirable"] == 32     # 48 pairs' worth: 16 with both answers, 16 good, 16 bad
    assert changed(art["base_model_path"], art["merged_path"])
