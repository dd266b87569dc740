"""KTO's labelled feedback (unpaired good/bad answers, TRL's {prompt, completion, label} shape, as
MedicalGPT / Zhongjing feedback comes): the `kto` format reads the bundled sample into the exact
rows the stage trains on, pairs mixed in are split as TRL's unpair_preference_dataset does, and a
record without its label is refused with one line naming file:line and the field."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import medpipe

SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "kto_feedback_en.jsonl"
PAIRS = Path(__file__).resolve().parent.parent / "samples" / "preference_en.jsonl"


def test_the_bundled_sample_reads_into_exact_rows():
    from medpipe.data import load_records
    from medpipe.stages.kto import feedback_rows

    pairs = [json.loads(line) for line in PAIRS.read_text(encoding="utf-8").splitlines()]
    loaded = load_records(str(SAMPLE), "feedback")            # the shape is detected: no format given
    assert loaded.reports[0].format == "kto"
    rows = feedback_rows(loaded.records, print)
    assert len(rows) == 64 and sum(r["label"] for r in rows) == 32
    # pair i of preference_en.jsonl: both answers when i % 3 == 0, only the good one when 1, only the bad one when 2
    want = []
    for i, pr in enumerate(pairs[:48]):
        prompt = [{"role": "user", "content": pr["question"]}]
        good = {"prompt": prompt, "completion": [{"role": "assistant", "content": pr["response_chosen"]}], "label": True}
        bad = {"prompt": prompt, "completion": [{"role": "assistant", "content": pr["response_rejected"]}], "label": False}
        want += [good, bad] if i % 3 == 0 else [good] if i % 3 == 1 else [bad]
    key = lambda r: (r["prompt"][0]["content"], r["label"])  # noqa: E731
    assert sorted(rows, key=key) == sorted(want, key=key)


def test_string_shape_csv_labels_and_pairs_mixed_in(tmp_path):
    from medpipe.data import load_records
    from medpipe.stages.kto import feedback_rows

    j = tmp_path / "fb.jsonl"
    j.write_text(json.dumps({"prompt": "Is aspirin safe in children?", "completion": "Avoid it under 16.",
                             "label": True, "system": "You are a doctor."}) + "\n", encoding="utf-8")
    c = tmp_path / "fb.csv"
    c.write_text("prompt,completion,label\nFever remedy?,Drink water and rest.,true\nFever remedy?,Take antibiotics.,0\n",
                 encoding="utf-8")
    p = tmp_path / "pairs.jsonl"
    p.write_text(json.dumps({"prompt": "Cough?", "chosen": "See a doctor if it lasts 3 weeks.",
                             "rejected": "Ignore it."}) + "\n", encoding="utf-8")
    spec = [{"path": str(j), "format": "kto"}, {"path": str(c), "format": "unpaired"}, str(p)]
    rows = feedback_rows(load_records(spec, "feedback").records, print)
    key = lambda r: (r["prompt"][-1]["content"], r["completion"][0]["content"])  # noqa: E731  (load_records mixes the sources)
    assert sorted(rows, key=key) == sorted([
        {"prompt": [{"role": "system", "content": "You are a doctor."},
                    {"role": "user", "content": "Is aspirin safe in children?"}],
         "completion": [{"role": "assistant", "content": "Avoid it under 16."}], "label": True},
        {"prompt": [{"role": "user", "content": "Fever remedy?"}], "completion": [{"role": "assistant", "content": "Drink water and rest."}], "label": True},
        {"prompt": [{"role": "user", "content": "Fever remedy?"}], "completion": [{"role": "assistant", "content": "Take antibiotics."}], "label": False},
        {"prompt": [{"role": "user", "content": "Cough?"}], "completion": [{"role": "assistant", "content": "See a doctor if it lasts 3 weeks."}], "label": True},
        {"prompt": [{"role": "user", "content": "Cough?"}], "completion": [{"role": "assistant", "content": "Ignore it."}], "label": False}], key=key)


def _recipe(tmp_path: Path, data: str) -> Path:
    r = tmp_path / "kto.yaml"
    r.write_text("defaults: [base, model: tiny, _self_]\nname: k\nstages:\n"
                 f"  kto: {{kind: kto, data: {{path: '{data}', format: kto}}, max_steps: 1, batch_size: 4}}\n")
    return r


def _one_line_exit_2(tmp_path: Path, second_line: str, expect: list[str]) -> None:
    d = tmp_path / "fb.jsonl"
    good = json.dumps({"prompt": "Fever?", "completion": "Rest and fluids.", "label": True})
    d.write_text(good + "\n" + second_line + "\n", encoding="utf-8")
    r = medpipe("validate", f"recipe={_recipe(tmp_path, str(d))}", f"run.root={tmp_path}/runs")
    errors = [ln for ln in r.out.splitlines() if ln.startswith("medpipe: error:")]
    assert r.code == 2, r.out
    assert len(errors) == 1 and "Traceback" not in r.out, r.out
    for e in [f"{d}:2:", *expect]:
        assert e in errors[0], errors[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("artifact.json"))


def test_validate_refuses_a_missing_label(tmp_path):
    _one_line_exit_2(tmp_path, json.dumps({"prompt": "Cough?", "completion": "Ignore it."}), ["'label'", "missing"])


def test_validate_refuses_a_label_that_is_not_true_or_false(tmp_path):
    _one_line_exit_2(tmp_path, json.dumps({"prompt": "Cough?", "completion": [{"role": "assistant", "content": "Ignore it."}], "label": "bad"}),
                     ["'label'", "expected true or false"])


def test_the_fixture_in_both_trl_shapes_is_detected_and_read_exactly():
    """TRL's standard (strings) and conversational (turns) unpaired rows; a good and a bad answer to
    one prompt stay two records (the duplicate check keys them on prompt + answer)."""
    from medpipe.data import detect_format, load_records

    path = Path(__file__).parent / "fixtures" / "formats" / "kto.jsonl"
    assert detect_format(str(path))[0] == "kto"
    recs = {r["_loc"].rsplit(":", 1)[1]: {k: r[k] for k in ("prompt", "completion", "label")}
            for r in load_records(str(path), "feedback").records}
    hr = [{"role": "user", "content": "What is a normal resting heart rate for adults?"}]
    assert recs == {
        "1": {"prompt": hr, "completion": "60 to 100 beats per minute.", "label": True},
        "2": {"prompt": [{"role": "system", "content": "You are a cautious doctor."},
                         {"role": "user", "content": "Can I take ibuprofen with warfarin?"}],
              "completion": "Yes, freely; they do not interact.", "label": False},
        "3": {"prompt": hr, "completion": "About 200 beats per minute.", "label": False}}


def test_a_stage_that_wants_pairs_refuses_feedback_by_name(tmp_path):
    """dpo/orpo/cpo need pairs: a `kto` file there is one line naming the format and the want."""
    from medpipe.data import DataError, load_records

    path = Path(__file__).parent / "fixtures" / "formats" / "kto.jsonl"
    with pytest.raises(DataError, match="format 'kto' gives feedback records; a stage that wants preference"):
        load_records(str(path), "preference")


def test_pairs_that_are_all_identical_are_refused_for_kto_too(tmp_path):
    """kto splits pairs into answers; pairs whose answers are all the same teach nothing: refused
    when read, as for dpo (before the fix: read without a word, and the stage failed later)."""
    from medpipe.data import DataError, load_records

    p = tmp_path / "same.jsonl"
    p.write_text(json.dumps({"prompt": "Cough?", "chosen": "Rest.", "rejected": "Rest."}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="no usable preference pairs: all 1 have chosen == rejected"):
        load_records(str(p), "feedback")
