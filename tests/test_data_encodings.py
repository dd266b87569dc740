"""Encodings and containers: BOM, JSON layouts, CSV line bookkeeping, conf/data names."""
import json

import pytest

from medpipe.data import DataError, detect_format, load_records, parse_spec
from medpipe.data import sources


def locs(res):
    return sorted(r["_loc"].rsplit(":", 1)[1] for r in res.records)


def test_jsonl_with_bom_keeps_physical_lines(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes("\ufeff".encode() + b'{"text": "one"}\n\n{"text": "two"}\r\n{"text": "three"}\n')
    assert locs(load_records(str(p), "text")) == ["1", "3", "4"]


def test_json_wrapped_list_and_pretty_object(tmp_path):
    w = tmp_path / "w.json"
    w.write_text(json.dumps({"data": [{"text": "a"}, {"text": "b"}]}))
    assert locs(load_records(str(w), "text")) == ["[data][0]", "[data][1]"]
    one = tmp_path / "one.json"                      # a single-line JSONL record with a list
    one.write_text(json.dumps({"conversations": [{"from": "human", "value": "q"},
                                                 {"from": "gpt", "value": "a"}]}) + "\n")
    assert load_records(str(one), "chat").records[0]["messages"][1]["content"] == "a"


def test_broken_json_document_reports_line(tmp_path):
    p = tmp_path / "b.json"
    p.write_text('[\n  {"text": "a"},\n  {"text": "b",,}\n]\n')
    with pytest.raises(DataError) as e:
        load_records(str(p), "text")
    assert e.value.line == 3 and e.value.reason == "invalid_json"


def test_not_utf8(tmp_path):
    p = tmp_path / "gbk.jsonl"
    p.write_bytes('{"text": "ok"}\n'.encode() + '{"text": "高血压"}\n'.encode("gbk"))
    with pytest.raises(DataError, match="not UTF-8") as e:
        load_records({"path": str(p), "format": "text"}, "text")
    assert e.value.line == 2


def test_csv_row_width_and_tsv(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text('id,question,A,B,C,D,answer\n0,q,a,b,c,d,A\n1,q2,a,b,c\n')
    with pytest.raises(DataError) as e:
        load_records({"path": str(p), "format": "ceval"}, "mcq")
    assert e.value.line == 3 and "header has 7" in str(e.value)
    res = load_records({"path": str(p), "format": "ceval"}, "mcq", on_error="skip")
    assert res.reports[0].dropped_by_reason == {"bad_row": 1} and res.reports[0].records == 2
    t = tmp_path / "x.tsv"
    t.write_text("text\nfirst doc\nsecond doc\n")
    assert locs(load_records(str(t), "text")) == ["2", "3"]


def test_detect_reason_names_keys(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"instruction": "i", "input": "", "output": "o"}\n')
    fmt, why = detect_format(str(p))
    assert fmt == "alpaca" and "instruction" in why


def test_conf_data_name(tmp_path, monkeypatch):
    d = tmp_path / "conf_data"
    d.mkdir()
    f = tmp_path / "x.jsonl"
    f.write_text('{"text": "hello"}\n')
    (d / "mycorpus.yaml").write_text(f"sources:\n  - path: {f}\n    weight: 2\n")
    monkeypatch.setattr(sources, "_conf_data_dir", lambda: d)
    [s] = parse_spec("mycorpus")
    assert s.path == str(f) and s.weight == 2.0
    assert load_records("mycorpus", "text").records[0]["text"] == "hello"
    with pytest.raises(DataError, match="no data config named"):
        parse_spec("nosuchname")


def test_limit_counts_first_records(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(10)))
    res = load_records({"path": str(p), "limit": 4}, "text")
    assert locs(res) == ["1", "2", "3", "4"] and res.reports[0].records == 4
