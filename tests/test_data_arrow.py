"""The Arrow path (records memory-mapped from reader to encoder) gives the same records, in the
same mixed order, with the same counts and the same errors as the list path (load_records)."""
from __future__ import annotations

from pathlib import Path

import pytest

from medpipe.data import DataError, load_records
from medpipe.data.arrow import chat_arrow, streamable

F = Path(__file__).parent / "fixtures" / "formats"
B = F / "broken"


def test_same_records_same_order_same_counts(tmp_path):
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"instruction": "Tell me about insulin.", "output": "A hormone."}\n' * 3 +
                   '{"instruction": "fever", "output": "rest"}\n', encoding="utf-8")
    spec = [{"path": str(F / "alpaca.json"), "weight": 2}, {"path": str(F / "sharegpt.json"), "weight": 1},
            {"path": str(dup), "dedup": "exact"}]
    assert streamable(spec)
    listed = load_records(spec, "chat", seed=5)
    arrow = chat_arrow(spec, tmp_path / "work", seed=5)
    got = arrow.dataset.to_list()
    assert [r["_loc"] for r in got] == [r["_loc"] for r in listed.records]
    assert [r["messages"] for r in got] == [r["messages"] for r in listed.records]
    for a, b in zip(arrow.reports, listed.reports):
        assert (a.records, a.kept, a.duplicates, a.mixed, a.dropped_by_reason, a.format) == \
               (b.records, b.kept, b.duplicates, b.mixed, b.dropped_by_reason, b.format)
    assert arrow.reports[2].dropped_by_reason == {"duplicate": 2}


@pytest.mark.parametrize("name,line,field", [("alpaca_missing_output.jsonl", 2, "output"),
                                             ("malformed.jsonl", 3, None),
                                             ("sharegpt_bad_role.jsonl", 1, "conversations[1].from")])
def test_same_errors(tmp_path, name, line, field):
    with pytest.raises(DataError) as listed:
        load_records(str(B / name), "chat")
    with pytest.raises(DataError) as arrow:
        chat_arrow(str(B / name), tmp_path)
    assert str(arrow.value) == str(listed.value)
    assert (arrow.value.line, arrow.value.field) == (line, field)


def test_heldout_and_near_dedup_take_the_list_path():
    assert not streamable(str(F / "alpaca.json"), heldout=0.1)
    assert not streamable({"path": str(F / "alpaca.json"), "dedup": "near"})
