"""Broken inputs raise DataError naming file:line:field; on_error='skip' counts instead."""
from pathlib import Path

import pytest

from medpipe.data import DataError, load_records, parse_spec

B = Path(__file__).parent / "fixtures" / "formats" / "broken"
F = B.parent


@pytest.mark.parametrize("name,want,line,field,reason", [
    ("malformed.jsonl", "chat", 3, None, "invalid_json"),
    ("alpaca_missing_output.jsonl", "chat", 2, "output", "missing_field"),
    ("alpaca_empty_instruction.jsonl", "chat", 3, "instruction", "empty_field"),
    ("messages_wrong_type.jsonl", "chat", 1, "messages[1].content", "wrong_type"),
    ("sharegpt_bad_role.jsonl", "chat", 1, "conversations[1].from", "bad_role"),
    ("medqa_bad_letter.jsonl", "mcq", 2, "answer_idx", "unknown_answer"),
    ("medqa_no_options.jsonl", "mcq", 2, "options", "missing_options"),
    ("medqa_options_wrong_type.jsonl", "mcq", 1, "options", "wrong_type"),
    ("medmcqa_cop0.json", "mcq", 1, "cop", "unknown_answer"),
    ("cmexam_bad_answer.csv", "mcq", 6, "Answer", "unknown_answer"),
    ("cmexam_no_options.csv", "mcq", 2, "Options", "empty_field"),
    ("pubmedqa_bad_decision.json", "mcq", "[123]", "final_decision", "unknown_answer"),
])
def test_broken_record_names_its_place(name, want, line, field, reason):
    path = str(B / name)
    with pytest.raises(DataError) as e:
        load_records(path, want)
    err = e.value
    assert (err.path, err.line, err.field, err.reason) == (path, line, field, reason)
    head = f"{path}:{line}: " + (f"field '{field}': " if field else "")
    assert str(err).startswith(head), str(err)


def test_empty_dataset():
    with pytest.raises(DataError, match="no records") as e:
        load_records(str(B / "empty.jsonl"), "chat")
    assert e.value.path == str(B / "empty.jsonl")
    with pytest.raises(DataError, match="no records"):
        load_records({"path": str(B / "empty.jsonl"), "format": "alpaca"}, "chat")


def test_unknown_source_key_lists_allowed():
    with pytest.raises(DataError) as e:
        parse_spec([{"path": "x.jsonl", "colums": {}}])
    msg = str(e.value)
    assert e.value.field == "colums" and "columns" in msg and "cop_base" in msg


def test_unknown_format_and_ambiguous_detection(tmp_path):
    with pytest.raises(DataError, match="unknown format"):
        parse_spec({"path": "x.jsonl", "format": "medqaa"})
    p = tmp_path / "mixed.jsonl"
    p.write_text('{"text": "a", "instruction": "b", "output": "c"}\n')
    with pytest.raises(DataError, match="ambiguous") as e:
        load_records(str(p), "chat")
    assert e.value.field == "format"
    q = tmp_path / "odd.jsonl"
    q.write_text('{"foo": 1}\n')
    with pytest.raises(DataError, match="set format"):
        load_records(str(q), "text")


def test_incompatible_want():
    with pytest.raises(DataError, match="can use"):
        load_records(str(F / "alpaca.json"), "preference")


def test_missing_file():
    with pytest.raises(DataError, match="not found"):
        load_records("/nonexistent/x.jsonl", "text")


def test_skip_counts_and_reports(tmp_path):
    res = load_records(str(B / "malformed.jsonl"), "chat", on_error="skip")
    [rep] = res.reports
    assert (rep.records, rep.kept, rep.dropped) == (3, 2, 1)
    assert rep.dropped_by_reason == {"invalid_json": 1}
    assert ":3:" in rep.examples[0] and res.skipped == 1
    assert "invalid_json=1" in res.summary_table()
    res = load_records([str(B / "medqa_bad_letter.jsonl"), str(B / "medqa_no_options.jsonl")],
                       "mcq", on_error="skip")
    assert [r.dropped_by_reason for r in res.reports] == [{"unknown_answer": 1},
                                                           {"missing_options": 1}]
    assert len(res.records) == 2 and res.reports[1].duplicates == 1   # same question twice
    with pytest.raises(DataError, match="no usable records"):
        load_records(str(B / "messages_wrong_type.jsonl"), "chat", on_error="skip")


def test_overlength_policy():
    from medpipe.stages.models.toytok import build_tokenizer
    tok = build_tokenizer(vocab_size=400)
    stats = load_records(str(F / "pretrain.jsonl"), "text", tokenizer=tok).reports[0]
    assert stats.token_max >= stats.token_p90 >= stats.token_p50 > 0
    limit = stats.token_p50                      # the longest record is over it
    keep = load_records(str(F / "pretrain.jsonl"), "text", tokenizer=tok, max_length=limit)
    rep = keep.reports[0]
    assert rep.overlength >= 1 and rep.truncated == rep.overlength and len(keep.records) == 3
    drop = load_records(str(F / "pretrain.jsonl"), "text", tokenizer=tok, max_length=limit,
                        overlength="drop")
    assert drop.reports[0].dropped_by_reason["overlength"] == rep.overlength
    assert len(drop.records) == 3 - rep.overlength
