"""Step-1 API: text/chat/preference loading, DataError, parse_spec, fingerprint, pack_texts."""
from pathlib import Path

import pytest

from medpipe.data import DataError, SourceSpec, fingerprint, load_records, parse_spec

F = Path(__file__).parent / "fixtures" / "formats"


def test_text_jsonl_and_txt():
    r = load_records(str(F / "pretrain.jsonl"), "text")
    assert sorted(x["_loc"].rsplit(":", 1)[1] for x in r.records) == ["1", "2", "4"]
    assert all(set(x) == {"text", "_loc"} for x in r.records)
    r = load_records(str(F / "pretrain.txt"), "text")
    assert {x["text"] for x in r.records} == {
        "Aspirin irreversibly inhibits cyclooxygenase.", "阿司匹林不可逆地抑制环氧化酶。",
        "Metformin lowers hepatic glucose production."}


def test_chat_shapes():
    a = load_records(str(F / "alpaca.json"), "chat", seed=0).records
    by = {x["_loc"].rsplit(":", 1)[1]: x for x in a}
    assert by["[1]"]["messages"] == [
        {"role": "user", "content": "请根据病历摘要给出初步诊断。\n\n患者男，65岁，胸痛2小时，心电图示ST段抬高。"},
        {"role": "assistant", "content": "急性ST段抬高型心肌梗死。"}]
    assert by["[0]"]["task"] is None
    s = {x["_loc"].rsplit(":", 1)[1]: x for x in load_records(str(F / "sharegpt.json"), "chat").records}
    assert [m["role"] for m in s["[0]"]["messages"]] == ["user", "assistant"] * 2
    assert s["[1]"]["messages"][0] == {"role": "system", "content": "你是一名医生。"}
    m = load_records(str(F / "messages.jsonl"), "chat").records
    assert len(m) == 2 and all(x["messages"][-1]["role"] == "assistant" for x in m)


@pytest.mark.parametrize("name", ["pref_prompt_chosen.jsonl", "pref_question_response.jsonl",
                                  "pref_conversations.json"])
def test_preference_shapes(name):
    recs = load_records(str(F / name), "preference").records
    assert recs
    for r in recs:
        assert r["prompt"][-1]["role"] == "user"
        assert isinstance(r["chosen"], str) and isinstance(r["rejected"], str)
        assert r["chosen"] != r["rejected"]


def test_parse_spec_forms(tmp_path):
    p = str(F / "alpaca.json")
    assert parse_spec(p)[0].path == p
    [s] = parse_spec({"path": "alpaca.json", "weight": 2, "format": "alpaca"}, base_dir=F)
    assert isinstance(s, SourceSpec) and s.path == p and s.weight == 2.0
    assert len(parse_spec([p, {"path": p}])) == 2
    from omegaconf import OmegaConf
    assert parse_spec(OmegaConf.create([{"path": p, "limit": 1}]))[0].limit == 1
    with pytest.raises(DataError) as e:
        parse_spec({"path": p, "weigth": 2})
    assert "weigth" in str(e.value) and "weight" in str(e.value) and e.value.field == "weigth"


def test_fingerprint_changes_with_content_and_options(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a"}\n')
    a = fingerprint(str(f))
    assert a == fingerprint(str(f))
    assert a != fingerprint({"path": str(f), "weight": 2})
    f.write_text('{"text": "b"}\n')
    assert a != fingerprint(str(f))
