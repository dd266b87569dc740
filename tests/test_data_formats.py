"""Each public format loads to the right normalised records (records shaped like the real files)."""
import json
from pathlib import Path

import pytest

from medpipe.data import DataError, FORMATS, detect_format, load_records

F = Path(__file__).parent / "fixtures" / "formats"
SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def recs_spec(spec, want, **kw):
    """records keyed by their location inside the file (line, [index] or [key])."""
    return {r["_loc"].rsplit(":", 1)[1]: r for r in load_records(spec, want, **kw).records}


def recs(path, want, **kw):
    return recs_spec(str(path), want, **kw)


def test_cmexam_bom_multiline_options_and_lines():
    assert detect_format(str(F / "cmexam.csv"))[0] == "cmexam"
    r = recs(F / "cmexam.csv", "mcq")
    assert set(r) == {"2", "7", "11"}          # starting lines of multi-line CSV records
    a = r["2"]
    assert a["question"].startswith("患者，男，65岁")
    assert a["options"] == {"A": "急性心肌梗死", "B": "稳定型心绞痛", "C": "主动脉夹层",
                            "D": "急性心包炎", "E": "肺栓塞"}
    assert a["answer"] == ["A"] and a["task"] == "cmexam" and a["subject"] == "内科学"
    assert a["explanation"] == "ST段抬高伴持续胸痛提示急性心肌梗死。"
    assert r["7"]["answer"] == ["A", "C"] and r["7"]["explanation"] is None
    assert r["11"]["explanation"] == "补液是首要措施，\n其次为小剂量胰岛素。"


def test_medqa():
    r = recs(F / "medqa.jsonl", "mcq")
    assert r["1"]["options"]["E"] == "Observation" and r["1"]["answer"] == ["A"]
    assert r["2"]["answer"] == ["B"] and r["2"]["subject"] == "step1"


def test_medmcqa_json_lines_cop_1_to_4():
    fmt, why = detect_format(str(F / "medmcqa_dev.json"))
    assert fmt == "medmcqa"
    r = recs(F / "medmcqa_dev.json", "mcq")   # .json that is JSON lines; default cop_base 1
    assert r["1"]["answer"] == ["B"] and r["1"]["options"]["B"] == "Ethosuximide"
    assert r["2"]["answer"] == ["D"] and r["2"]["explanation"] is None
    assert r["1"]["id"] == "45258d3d-b974-44dd-a161-c3fccbdadd88"
    assert r["1"]["subject"] == "Pharmacology"


def _medmcqa_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [json.loads(x) for x in (F / "medmcqa_dev.json").read_text().splitlines()]
    for x in rows:
        x["cop"] -= 1                           # the Hub's parquet copy numbers cop 0-3
    p = tmp_path / "validation-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p)
    return p


def test_medmcqa_parquet_needs_cop_base(tmp_path):
    p = _medmcqa_parquet(tmp_path)
    assert detect_format(str(p))[0] == "medmcqa"
    with pytest.raises(DataError) as e:
        load_records(str(p), "mcq")
    assert e.value.field == "cop_base" and str(p) in str(e.value)
    r = recs_spec({"path": str(p), "cop_base": 0}, "mcq")
    assert r["[0]"]["answer"] == ["B"] and r["[1]"]["answer"] == ["D"]


def test_pubmedqa_keyed_by_id():
    r = recs(F / "ori_pqal.json", "mcq")
    a = r["[21645374]"]
    assert a["id"] == "21645374" and a["options"] == {"A": "yes", "B": "no", "C": "maybe"}
    assert a["answer"] == ["A"] and a["context"].startswith("Programmed cell death")
    assert a["explanation"].startswith("Results depicted")
    assert r["[16418930]"]["answer"] == ["B"] and r["[9488747]"]["answer"] == ["C"]


def test_ceval_dev_val_test_and_split_selection():
    dev = recs(F / "clinical_medicine_dev.csv", "mcq")
    assert dev["2"]["subject"] == "clinical_medicine" and dev["2"]["answer"] == ["A"]
    assert dev["2"]["explanation"].startswith("1. 上消化道出血")
    assert dev["4"]["id"] == "clinical_medicine-1"        # row 2 starts on line 4 (multi-line)
    val = recs(F / "clinical_medicine_val.csv", "mcq")
    assert len(val) == 3 and all(v["explanation"] is None for v in val.values())
    test = recs(F / "clinical_medicine_test.csv", "mcq")   # no answer column → unlabeled
    assert test["2"]["answer"] == []
    sel = load_records({"path": str(F / "clinical_medicine_*.csv"), "split": "val"}, "mcq")
    assert len(sel.records) == 3
    with pytest.raises(DataError, match="unlabeled"):
        load_records(str(F / "clinical_medicine_test.csv"), "chat")


def test_promptcblue_task_from_record():
    r = recs(F / "promptcblue.jsonl", "chat")
    assert r["1"]["task"] == "CMeEE-V2" and r["2"]["task"] == "KUAKE-QQR"
    assert r["2"]["messages"][1] == {"role": "assistant", "content": "是的"}
    r = recs_spec({"path": str(F / "promptcblue.jsonl"), "task": "cblue"}, "chat")
    assert r["1"]["task"] == "cblue"


def test_huatuo_lite_and_full_as_text_and_chat():
    assert detect_format(str(F / "huatuo_lite.jsonl"))[0] == "huatuo"
    assert detect_format(str(F / "huatuo_encyclopedia.jsonl"))[0] == "huatuo"
    t = recs(F / "huatuo_lite.jsonl", "text")
    assert t["1"]["text"].startswith("问：孩子发烧38度5需要吃退烧药吗？\n答：体温超过38.5℃")
    c = recs(F / "huatuo_encyclopedia.jsonl", "chat")
    assert c["1"]["messages"][0]["content"] == "曲匹地尔片的用法用量"
    assert c["2"]["messages"][1]["content"] == "痛风是嘌呤代谢紊乱所致的疾病。"


def test_cmtmedqa_multi_turn_reads_as_alpaca_with_history():
    """CMtMedQA (Zhongjing; IIMedGPT's multi-turn test set): instruction / output / history of
    [question, answer] pairs, plus cate1 / cate2 / id; a JSON array, UTF-8 without BOM."""
    assert detect_format(str(F / "cmtmedqa_test.json"))[0] == "alpaca"
    r = recs(F / "cmtmedqa_test.json", "chat")
    turns = r["[0]"]["messages"]
    assert [m["role"] for m in turns] == ["user", "assistant"] * 3
    assert turns[0]["content"] == "医生您好，我咳嗽一周了，还有点发烧。" and turns[4]["content"] == "那需要做哪些检查？"
    assert turns[5]["content"].endswith("请及时就医。") and "\n" in turns[5]["content"]
    assert len(r["[1]"]["messages"]) == 2  # empty history: single turn


def test_mcq_renders_to_chat_with_answer_text_and_explanation():
    r = recs(F / "cmexam.csv", "chat")
    u, a = r["2"]["messages"]
    assert "A. 急性心肌梗死" in u["content"] and "E. 肺栓塞" in u["content"]
    assert a["content"] == "答案：A. 急性心肌梗死\n解析：ST段抬高伴持续胸痛提示急性心肌梗死。"
    assert r["2"]["task"] == "cmexam"
    assert r["7"]["messages"][1]["content"] == "答案：AC. 美托洛尔；比索洛尔"
    e = recs(F / "medqa.jsonl", "chat")
    assert e["2"]["messages"][1]["content"] == "Answer: B. Cyclooxygenase"
    p = recs(F / "ori_pqal.json", "chat")["[21645374]"]
    assert "Context: Programmed cell death" in p["messages"][0]["content"]
    assert p["messages"][1]["content"].startswith("Answer: A. yes\nExplanation: Results")
    # mcq → text (knowledge point)
    k = recs(F / "medqa.jsonl", "text")["2"]["text"]
    assert "Which enzyme" in k and k.endswith("Answer: B. Cyclooxygenase")


def test_columns_rename_and_error_names_file_field(tmp_path):
    p = tmp_path / "qa.jsonl"
    p.write_text('{"q": "What is HbA1c?", "a": "Glycated haemoglobin."}\n{"q": "x", "a": ""}\n')
    spec = {"path": str(p), "format": "alpaca", "columns": {"q": "instruction", "a": "output"}}
    with pytest.raises(DataError) as e:
        load_records(spec, "chat")
    assert (e.value.line, e.value.field) == (2, "a")
    spec["limit"] = 1
    [r] = load_records(spec, "chat").records
    assert r["messages"][1]["content"] == "Glycated haemoglobin."


def test_every_registered_format_has_a_fixture():
    covered = {"text", "huatuo", "alpaca", "sharegpt", "messages", "promptcblue", "preference",
               "cmexam", "medqa", "medmcqa", "pubmedqa", "ceval", "chatmed", "huatuogpt_eval", "paragraphs", "mmlu", "cmb",
               "kto"}
    assert set(FORMATS) == covered


@pytest.mark.skipif(not (SAMPLES / "pretrain.jsonl").exists(), reason="samples not written yet")
@pytest.mark.parametrize("name,want,fmt", [
    ("pretrain.jsonl", "text", "text"), ("sft_alpaca.json", "chat", "alpaca"),
    ("sft_sharegpt.json", "chat", "sharegpt"), ("preference.jsonl", "preference", "preference"),
    ("mcq_medqa.jsonl", "mcq", "medqa"), ("mcq_cmexam.csv", "mcq", "cmexam"),
    ("pubmedqa.json", "mcq", "pubmedqa"), ("medmcqa.json", "mcq", "medmcqa"),
    ("ceval_dev.csv", "mcq", "ceval"), ("ceval_val.csv", "mcq", "ceval")])
def test_bundled_samples_load_with_auto(name, want, fmt):
    res = load_records(str(SAMPLES / name), want)
    assert res.reports[0].format == fmt
    assert res.records and res.reports[0].dropped == 0
    if want == "mcq":
        assert load_records(str(SAMPLES / name), "chat").records


def test_pubmedqa_pqau_as_published_reads_as_unlabeled(tmp_path):
    import json as _json

    from medpipe.data import DataError, load_records

    pqau = {"1001": {"QUESTION": "Does aspirin prevent stroke?", "CONTEXTS": ["A cohort of 100 patients."],
                     "LABELS": ["RESULTS"], "MESHES": ["Aspirin"], "LONG_ANSWER": "Aspirin lowered the rate."}}
    path = tmp_path / "ori_pqau.json"
    path.write_text(_json.dumps(pqau))
    recs = load_records({"path": str(path), "format": "pubmedqa"}, "mcq").records
    assert recs[0]["answer"] == [] and recs[0]["explanation"] == "Aspirin lowered the rate."
    # a PQA-L record that lost its final_decision is still an error
    broken = {"2": {**pqau["1001"], "reasoning_required_pred": "yes", "reasoning_free_pred": "yes"}}
    path.write_text(_json.dumps(broken))
    try:
        load_records({"path": str(path), "format": "pubmedqa"}, "mcq")
    except DataError as e:
        assert "final_decision" in str(e) and "[2]" in str(e)
    else:
        raise AssertionError("missing final_decision in a PQA-L record was accepted")


def test_chatmed_query_response_with_and_without_the_wrapper():
    assert detect_format(str(F / "chatmed.jsonl"))[0] == "chatmed"
    r = recs(F / "chatmed.jsonl", "chat")
    assert r["1"]["messages"][0]["content"] == "你好,视神经萎缩,黄斑变性。怎样缓解,及日常注意事项。谢谢。"
    assert r["2"]["messages"] == [{"role": "user", "content": "孩子发烧38.5度怎么办？"},
                                  {"role": "assistant", "content": "可以先物理降温，多喝水，超过38.5度可服用退烧药。"}]


def test_huatuogpt_eval_files():
    assert detect_format(str(F / "Med-dialog_100.json"))[0] == "huatuogpt_eval"
    r = recs(F / "Med-dialog_100.json", "chat")
    assert r["[1]"]["messages"][1]["content"].startswith("病情摘要及初步印象：\n表皮痣")
    assert r["[0]"]["subject"] == "皮肤科"
    assert detect_format(str(F / "KUAKE-QIC_100.json"))[0] == "huatuogpt_eval"
    with pytest.raises(DataError) as e:
        load_records(str(F / "KUAKE-QIC_100.json"), "chat")
    assert (e.value.line, e.value.field, e.value.reason) == ("[0]", "query", "unlabeled")
    assert "unlabeled split" in str(e.value)


def test_huatuo26m_test_lists_in_the_singular_keys():
    r = recs_spec({"path": str(F / "huatuo26m_test.jsonl"), "format": "huatuo"}, "chat")
    assert r["2"]["messages"][0]["content"] == "糖尿病人能吃水果吗？"  # the first of the paraphrases
    assert r["1"]["messages"][1]["content"] == "可能是偏头痛，也可能是颅内压增高，建议就医。"


def test_hard_wrapped_text_is_one_document_per_paragraph():
    assert detect_format(str(F / "wrapped.txt"))[0] == "paragraphs"
    r = recs(F / "wrapped.txt", "text")
    assert set(r) == {"1", "4", "9"}  # each paragraph's first line
    assert r["4"]["text"] == ("Metformin is the first-line medication for the\ntreatment of type 2 diabetes,\n"
                              "particularly in people who are overweight.")
    assert detect_format(str(F / "pretrain.txt"))[0] == "text"  # one document per line stays that


def test_cmexam_skipped_option_letters_keep_their_letters():
    [r] = recs(F / "cmexam_skipped_letter.csv", "mcq").values()
    assert r["options"] == {"A": "心电图", "B": "胸片", "D": "冠脉造影", "E": "超声心动图"}
    assert r["answer"] == ["D"]


def test_promptcblue_test_split_without_targets_says_unlabeled(tmp_path):
    p = tmp_path / "test.json"
    p.write_text('{"input": "判断句子的意图：头痛怎么办", "target": "", "answer_choices": ["治疗方案"], '
                 '"task_type": "cls", "task_dataset": "KUAKE-QIC", "sample_id": "t1"}\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_records(str(p), "chat")
    assert (e.value.line, e.value.field, e.value.reason) == (1, "target", "unlabeled")
    assert "unlabeled split" in str(e.value)


def test_ids_filter_keeps_the_listed_items(tmp_path):
    truth = tmp_path / "test_ground_truth.json"
    truth.write_text(json.dumps({"21645374": "yes"}))  # PubMedQA's test_ground_truth.json shape
    res = load_records({"path": str(F / "ori_pqal.json"), "ids": str(truth)}, "mcq")
    assert [r["id"] for r in res.records] == ["21645374"]
    assert res.reports[0].dropped_by_reason == {"not_in_ids": res.reports[0].records - 1}
    res = load_records({"path": str(F / "ori_pqal.json"), "ids": ["21645374", "999"]}, "mcq")
    assert res.reports[0].ids_missing == 1 and "1 id(s) listed in ids: match no record" in res.summary_table()


def test_mmlu_headerless_csv_as_published(tmp_path):
    """hendrycks/test data/test/<subject>_test.csv: no header, RFC-4180 quoting (commas, "" and a
    newline inside quoted fields); the subject from the file name; records from line 1."""
    path = F / "mmlu" / "data" / "test" / "anatomy_test.csv"
    fmt, why = detect_format(str(path))
    assert fmt == "mmlu" and "header-less" in why
    r = recs(path, "mcq")
    assert sorted(r, key=int) == ["1", "2", "3", "5", "6", "7"]     # row 3 spans lines 3-4
    assert r["1"]["options"]["C"] == "paralysis of the facial muscles, loss of taste and lacrimation."
    assert r["3"]["question"] == 'The "anatomical snuffbox" is bounded medially by the tendon of\nwhich muscle?'
    assert (r["3"]["answer"], r["3"]["subject"], r["3"]["id"], r["3"]["task"]) == (["C"], "anatomy", "anatomy-3", "mmlu")
    assert r["6"]["question"] == "The thoracic duct drains into the"
    dev = load_records(str(F / "mmlu" / "data" / "dev"), "mcq").records   # a folder of dev files
    assert sorted(x["id"] for x in dev) == ["anatomy-1", "anatomy-2", "anatomy-3", "clinical_knowledge-1",
                                            "clinical_knowledge-2"]
    # the same rows under another name: not detected (too little to go on), read with format: mmlu
    other = tmp_path / "anatomy.csv"
    other.write_bytes(path.read_bytes())
    with pytest.raises(DataError, match="set format: mmlu"):
        detect_format(str(other))
    assert len(load_records({"path": str(other), "format": "mmlu"}, "mcq").records) == 6
    # C-Eval's test header id,question,A,B,C,D also ends in a letter: still a header
    assert detect_format(str(F / "clinical_medicine_test.csv"))[0] == "ceval"
    bad = tmp_path / "x_test.csv"
    bad.write_text("Q1,a,b,c,d,A\nQ2,a,b,c,d,E\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_records(str(bad), "mcq")
    assert (e.value.line, e.value.field) == (2, "answer")


def test_cmb_exam_json_as_published():
    """CMB-Exam (FreedomIntelligence/CMB data/CMB.zip): CMB-val-merge.json, a JSON array with
    exam_type/exam_class/exam_subject/question/answer ("ABD" for 多项选择题)/question_type/option;
    the test questions carry an id and no answer (published apart) → unlabeled."""
    val = F / "CMB-Exam" / "CMB-val" / "CMB-val-merge.json"
    assert detect_format(str(val))[0] == "cmb"
    r = recs(val, "mcq")
    assert r["[1]"]["answer"] == ["A", "B", "D"] and r["[1]"]["options"] == {
        "A": "生活方式干预", "B": "二甲双胍", "C": "胰岛素泵", "D": "饮食控制"}        # the empty "E" dropped
    assert (r["[1]"]["question_type"], r["[1]"]["exam_type"], r["[1]"]["exam_class"], r["[1]"]["subject"]) == (
        "多项选择题", "医师考试", "规培结业", "内科")
    assert r["[0]"]["explanation"] == "V1～V4导联ST段抬高提示前壁心肌梗死。" and r["[1]"]["explanation"] is None
    test = recs(F / "CMB-Exam" / "CMB-test" / "CMB-test-choice-question-merge.json", "mcq")
    assert [(k, v["id"], v["answer"]) for k, v in sorted(test.items())] == [("[0]", "1", []), ("[1]", "2", [])]
