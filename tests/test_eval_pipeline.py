"""An eval after every stage of the qilin chain yields the paper-style table (tiny model)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import QUICK, REPO, medpipe, read_artifact

pytestmark = pytest.mark.slow

RECIPE = str(REPO / "tests" / "recipes" / "qilin_eval.yaml")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("qilin_eval") / "runs"
    r = medpipe("run", f"recipe={RECIPE}", f"run.root={root}", f"run.dir={root}/main", *QUICK)
    assert r.code == 0, r.out
    return root, root / "main", r.out


def test_each_eval_stage_records_the_stage_it_evaluated(run):
    _, run_dir, out = run
    info = json.loads((run_dir / "run.json").read_text())
    evals = {s["name"]: read_artifact(Path(s["store_dir"]))
             for s in info["stages"] if s["kind"] == "eval"}
    assert {n: a["evaluated_stage"] for n, a in evals.items()} == \
        {"eval_cpt": "cpt", "eval_sft": "sft", "eval_dpo": "dpo"}
    for a in evals.values():
        assert {"cmexam/acc", "medqa/acc", "alpaca/bleu4", "alpaca/rougeL"} <= set(a["metrics"])
        assert a["results"]["cmexam"]["n"] == 24
    assert evals["eval_sft"]["model_path"].endswith("/merged")  # the adapter is evaluated merged
    assert "cmexam: acc=" in out


def test_report_table_has_one_row_per_stage(run):
    _, run_dir, _ = run
    assert medpipe("report", str(run_dir)).code == 0
    md = (run_dir / "report.md").read_text()
    table = md.split("## Metrics")[1].split("##")[0]
    rows = [line.split(" | ")[0].strip("| ") for line in table.splitlines() if line.startswith("| ")][1:]
    assert rows == ["cpt", "sft", "dpo"]
    assert all((run_dir / "report_files" / f"{n}.png").is_file() for n in ("01-cpt", "02-sft", "03-dpo"))


def test_rerun_reuses_eval_stages_and_medpipe_eval_adds_columns(run):
    root, run_dir, _ = run
    again = medpipe("run", f"recipe={RECIPE}", f"run.root={root}", f"run.dir={run_dir}", *QUICK)
    assert again.code == 0 and again.out.count("✓ reused") == 6, again.out
    r = medpipe("eval", str(run_dir), "--stage", "dpo", "data=ceval_val", "shots=5", "fewshot_data=ceval_dev")
    assert r.code == 0, r.out
    medpipe("report", str(run_dir))
    md = (run_dir / "report.md").read_text()
    assert "ceval@cue-5shot/acc" in md.split("## Metrics")[1]  # medpipe eval keys by set and method


def test_medpipe_eval_applies_groups_heldout_and_judge_skip_as_the_stage_does(run):
    """`medpipe eval` runs what an eval stage runs: `groups`, `heldout`, and a judge eval without
    judge.url is skipped with the stage's line and records nothing."""
    _, run_dir, _ = run
    r = medpipe("eval", str(run_dir), "--stage", "sft", "data=ceval_val", "groups={exams:[ceval*]}",
                "heldout.preference=${data.preference}", "heldout.limit=6")
    assert r.code == 0, r.out
    rec = json.loads((run_dir / "eval" / "sft.json").read_text())
    m = rec["metrics"]
    assert m["exams@cue/acc"] == m["ceval@cue/acc"]  # a group of one set is that set
    assert rec["results"]["exams@cue"]["members"] == ["ceval"]
    pref = rec["results"]["heldout_pref"]
    assert pref["n"] == 6 and m["heldout_pref/acc"] == pref["metrics"]["acc"]
    assert f"heldout_pref: chosen preferred on {round(pref['metrics']['acc'] * 6)}/6 held-out pairs" in r.out
    before = (run_dir / "eval" / "sft.json").read_bytes()
    skip = medpipe("eval", str(run_dir), "--stage", "sft", "data=ceval_val", "needs_judge=true")
    assert skip.code == 0, skip.out
    assert "skipped: no judge endpoint configured (set judge.url=http://HOST:PORT/v1 to score with " \
           "judge.template=" in skip.out
    assert (run_dir / "eval" / "sft.json").read_bytes() == before
