"""`medpipe report`: stage table, metrics table one row per evaluated stage (eval stages and
`medpipe eval` results joined), per-subject table, pairwise lines, PNG curves, config."""
from __future__ import annotations

import json

from _evalrun import fake_run
from conftest import medpipe
from medpipe.artifact import Artifact, write_json_atomic


def add_eval_stage(run_dir, name, evaluated, metrics, results=None):
    info = json.loads((run_dir / "run.json").read_text())
    sdir = run_dir.parent / ".store" / f"eval-{name}"
    sdir.mkdir(parents=True)
    Artifact(stage=name, kind="eval", format="full", model_path="m", tokenizer_path="m", metrics=metrics,
             evaluated_stage=evaluated, results=results or {}).save(sdir)
    write_json_atomic(sdir / "status.json", {"state": "done", "elapsed": 3.0})
    link = f"{len(info['stages']) + 1:02d}-{name}"
    (run_dir / link).symlink_to(sdir)
    info["stages"].append({"name": name, "kind": "eval", "link": link, "store_dir": str(sdir), "key": name})
    write_json_atomic(run_dir / "run.json", info)


def test_report_joins_eval_results_onto_the_evaluated_stages(tmp_path):
    run_dir = fake_run(tmp_path)
    subj = {"cmexam": {"subjects": {"内科学": {"n": 3, "acc": 1 / 3}, "外科学": {"n": 2, "acc": 0.5}}}}
    add_eval_stage(run_dir, "eval_sft", "sft", {"cmexam/acc": 0.4, "cmexam/f1_weighted": 0.35}, subj)
    add_eval_stage(run_dir, "eval_dpo", "dpo", {"cmexam/acc": 0.45, "cmexam/f1_weighted": 0.4,
                                                "huatuo/bleu1": 0.12, "huatuo/judge_fluency": 3.5})
    write_json_atomic(run_dir / "eval" / "cpt.json", {"stage": "cpt", "evaluated_stage": "cpt",
                                                      "metrics": {"cmexam/acc": 0.3, "ceval/acc": 0.25}, "results": {}})
    write_json_atomic(run_dir / "eval" / "pairwise-dpo-vs-sft.json", {
        "a": "dpo", "b": "sft", "line": "dpo vs sft: 41 % win, 37 % tie, 22 % lose (100 judged in both orders, "
                                         "9 inconsistent → tie, 0 malformed)", "summary": {"n": 100}})
    r = medpipe("report", str(run_dir))
    assert r.code == 0, r.out
    md = (run_dir / "report.md").read_text()
    page = (run_dir / "report.html").read_text()
    table = md.split("## Metrics")[1].split("###")[0]
    assert "| stage | cmexam/acc | cmexam/f1_weighted | ceval/acc | huatuo/bleu1 | huatuo/judge_fluency |" in table
    assert "| cpt | 30.0 | – | 25.0 | – | – |" in table
    assert "| sft | 40.0 | 35.0 | – | – | – |" in table
    assert "| dpo | 45.0 | 40.0 | – | 12.0 | 3.50 |" in table
    assert "| 内科学 | 3 | 33.3 |" in md  # per-subject accuracy
    assert "dpo vs sft: 41 % win, 37 % tie, 22 % lose" in md and "9 inconsistent" in page
    # stage table: status, time, artifact, tokens seen
    assert "| dpo | dpo | done | 14s | 3,000 |" in md and "reward_margin 0.4" in md
    assert "| eval_dpo | eval | done | 3s |  |  | evaluates dpo |" in md
    assert "```yaml\nname: fake" in md and "<details><summary>config.yaml" in page
    for i, name in enumerate(("cpt", "sft", "dpo")):
        png = run_dir / "report_files" / f"{i + 1:02d}-{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f'src="report_files/{i + 1:02d}-{name}.png"' in page and f"(report_files/{i + 1:02d}-{name}.png)" in md
    assert '<th colspan="2">cmexam</th>' in page  # the set spans its metrics


def test_dpo_curve_has_the_reward_margin_panel(tmp_path):
    import matplotlib.image

    run_dir = fake_run(tmp_path)
    medpipe("report", str(run_dir))
    sft = matplotlib.image.imread(run_dir / "report_files" / "02-sft.png")
    dpo = matplotlib.image.imread(run_dir / "report_files" / "03-dpo.png")
    assert dpo.shape[1] > 1.8 * sft.shape[1]  # two panels: loss and reward margin


def test_medcare_da_curve_shows_the_loss_parts(tmp_path):
    """DA logs CE and the orthogonal term separately: a second panel draws them, each on its axis;
    MKA (CE only) keeps one panel."""
    import matplotlib.image

    from medpipe.commands.report import draw_curves

    rows = [{"step": s, "loss": 100 / s + 7, "ce_loss": 7 + 1 / s, "orth_loss": 100 / s} for s in range(1, 6)]
    da = draw_curves({"name": "da", "kind": "medcare_da", "history": rows}, tmp_path / "da.png")
    mka = draw_curves({"name": "mka", "kind": "medcare_mka",
                       "history": [{k: v for k, v in r.items() if k != "orth_loss"} for r in rows]}, tmp_path / "mka.png")
    assert matplotlib.image.imread(da).shape[1] > 1.8 * matplotlib.image.imread(mka).shape[1]


def test_report_without_evals_and_on_a_non_run(tmp_path):
    run_dir = fake_run(tmp_path, history=False)
    assert medpipe("report", str(run_dir)).code == 0
    md = (run_dir / "report.md").read_text()
    assert "No evaluation results yet" in md and "Training curves" not in md
    r = medpipe("report", str(tmp_path / "nowhere"))
    assert r.code == 2 and "not a medpipe run dir" in r.out


def _paper_run(tmp_path):
    """A fake qilin-like run: the base model, cpt and sft evaluated (dpo not), references in config.yaml."""
    from _evalrun import samples

    run_dir = fake_run(tmp_path)
    cm = {"cmexam": {"kind": "mcq", "n": 60, "metrics": {}}}
    add_eval_stage(run_dir, "cmexam_base", "base", {"cmexam/acc": 0.25, "cmexam/invalid": 3,
                                                     "heldout_text/ppl": 4000.0}, cm)
    add_eval_stage(run_dir, "cmexam_cpt", "cpt", {"cmexam/acc": 0.30, "cmexam/invalid": 0,
                                                   "heldout_text/ppl": 500.0}, cm)
    add_eval_stage(run_dir, "cmexam_sft", "sft", {"cmexam/acc": 0.40, "heldout_text/ppl": 450.0,
                                                   "huatuo26m_test/bleu1": 0.125}, cm)
    ref = "  - {{table: {t}, row: {r}, stage: {s}, column: {c}, value: {v}, metric: {m}, data: {d}}}\n"
    (run_dir / "config.yaml").write_text(
        "name: fake\nmodel: {name: tiny}\n"
        f"data:\n  cmexam: {{path: {samples()}/mcq_cmexam.csv, format: cmexam}}\nreference:\n"
        + ref.format(t="Table 5", r="Baichuan-7B", s="base", c="Accuracy", v=33.5, m="cmexam/acc", d="CMExam test")
        + ref.format(t="Table 5", r="Qilin-Med-7B-CPT", s="cpt", c="Accuracy", v=38.4, m="cmexam/acc", d="CMExam test")
        + ref.format(t="Table 5", r="Qilin-Med-7B-SFT", s="sft", c="Accuracy", v=40.0, m="cmexam/acc", d="CMExam test")
        + ref.format(t="Table 4", r="Baichuan-7B", s="base", c="Average", v=42.8, m="null", d="C-Eval")
        + ref.format(t="Table 7", r="LoRA", s="null", c="PubMedQA", v=86.6, m="pubmedqa/acc", d="PubMedQA"))
    return run_dir


def test_before_after_table_beside_the_paper(tmp_path):
    import csv

    run_dir = _paper_run(tmp_path)
    r = medpipe("report", str(run_dir))
    assert r.code == 0, r.out
    note = ("paper (Table 5): Baichuan-7B on CMExam test; this run: tiny on the 60-item bundled sample "
            "(model and data differ)")
    rows = list(csv.reader((run_dir / "report.csv").read_text().splitlines()))
    assert rows == [
        ["metric", "base", "cpt", "sft", "change", "paper", "paper_change", "note"],
        ["cmexam/acc", "25.0", "30.0", "40.0", "15.0", "33.5 (base) → 38.4 (cpt) → 40 (sft)", "6.5", note],
        ["heldout_text/ppl", "4000.0", "500.0", "450.0", "-3550.0", "", "", ""],
        ["huatuo26m_test/bleu1", "", "", "12.5", "", "", "", ""],
    ]  # counts (cmexam/invalid) are not in the table; dpo has no eval, so no column
    md = (run_dir / "report.md").read_text()
    section = md.split("## Before → after, beside the paper")[1].split("## Metrics")[0]
    assert "| metric | base | cpt | sft | change | paper | paper change | note |" in section
    assert f"| cmexam/acc | 25.00 | 30.00 | 40.00 | +15.00 | 33.5 (base) → 38.4 (cpt) → 40 (sft) | +6.50 | {note} |" in section
    assert "| heldout_text/ppl | 4000.00 | 500.00 | 450.00 | -3550.00 |  | – |  |" in section
    assert "| Table 4 | Baichuan-7B | Average | 42.8 | this recipe measures no counterpart |" in section
    assert "| Table 7 | LoRA | PubMedQA | 86.6 | another setting than this recipe's default |" in section
    assert "note: the tiny model is randomly initialised" in section
    data = json.loads((run_dir / "report.json").read_text())
    assert data["stages"] == ["base", "cpt", "sft"] and data["model"] == "tiny"
    acc = data["rows"][0]
    assert acc["values"] == {"base": 25.0, "cpt": 30.0, "sft": 40.0} and acc["change"] == 15.0
    assert [p["value"] for p in acc["paper"]] == [33.5, 38.4, 40.0] and acc["paper_change"] == 6.5
    assert "Before → after, beside the paper" in (run_dir / "report.html").read_text()


def test_a_skipped_judge_stage_says_why_in_the_report(tmp_path):
    run_dir = fake_run(tmp_path)
    info = json.loads((run_dir / "run.json").read_text())
    sdir = run_dir.parent / ".store" / "eval-ccte"
    sdir.mkdir(parents=True)
    why = "skipped: no judge endpoint configured (set stages.ccte.judge.url=http://HOST:PORT/v1 ...)"
    Artifact(stage="ccte", kind="eval", format="full", model_path="m", tokenizer_path="m", evaluated_stage="sft",
             handoff={"skipped": why}).save(sdir)
    write_json_atomic(sdir / "status.json", {"state": "done", "elapsed": 1.0})
    (run_dir / "04-ccte").symlink_to(sdir)
    info["stages"].append({"name": "ccte", "kind": "eval", "link": "04-ccte", "store_dir": str(sdir), "key": "c"})
    write_json_atomic(run_dir / "run.json", info)
    assert medpipe("report", str(run_dir)).code == 0
    assert f"| ccte | eval | done | 1s |  |  | evaluates sft: {why} |" in (run_dir / "report.md").read_text()
