"""Metrics: tokenisation, BLEU/ROUGE through sacrebleu / rouge-score, mcq scoring, answer
extraction, PromptCBLUE per-task scoring, judge reply parsing."""
from __future__ import annotations

import pytest

from medpipe.stages import metrics as M


def test_char_tokenisation_splits_cjk_keeps_latin_words():
    assert M.tokenize("患者Fever 38度，咳嗽。") == ["患", "者", "fever", "38", "度", "，", "咳", "嗽", "。"]
    assert M.tokenize("患者发热咳嗽", "jieba") == ["患者", "发热", "咳嗽"]
    with pytest.raises(ValueError):
        M.tokenize("x", "words")


def test_bleu_is_sacrebleu_on_characters():
    from sacrebleu.metrics import BLEU

    hyps, refs = ["患者发热三天伴咳嗽", "头痛恶心"], ["患者发热咳嗽三天", "偏头痛伴恶心呕吐"]
    # pure CJK text: sacrebleu's own zh tokenizer splits characters the same way
    assert M.bleu(hyps, refs, 4) == pytest.approx(BLEU(tokenize="zh").corpus_score(hyps, [refs]).score / 100)
    b1 = M.bleu(hyps, refs, 1)
    assert M.bleu(hyps, refs, 4) < b1 <= 1.0


def test_generation_scores_bounds_and_tokenisation_matters():
    same = M.generation_scores(["患者发热咳嗽三天"], ["患者发热咳嗽三天"])
    assert all(v == pytest.approx(1.0) for v in same.values()), same
    ch = M.generation_scores(["患者发热三天"], ["患者咳嗽三天"], tokenize="char")
    jb = M.generation_scores(["头痛恶心"], ["头疼恶心"], tokenize="jieba")
    assert set(ch) == {"bleu1", "bleu4", "rouge1", "rouge2", "rougeL"}
    assert ch["rouge1"] == pytest.approx(4 / 6)  # 4 of 6 characters shared
    assert jb["rouge1"] == pytest.approx(1 / 2)  # words 头痛/恶心 vs 头疼/恶心; characters would give 3/4
    assert M.generation_scores(["头痛恶心"], ["头疼恶心"])["rouge1"] == pytest.approx(3 / 4)
    assert 0 <= ch["rougeL"] <= 1 and 0 <= ch["bleu4"] <= 1


def test_generation_scores_need_references():
    with pytest.raises(ValueError, match="no references"):
        M.generation_scores([], [])
    with pytest.raises(ValueError, match="empty reference"):
        M.generation_scores(["a"], [" "])


@pytest.mark.parametrize("text,expected", [
    ("答案为AC", (["A", "C"], None)), ("答案：A、C", (["A", "C"], None)), ("The answer is B.", (["B"], None)),
    ("Answer: (D)", (["D"], None)), ("AC", (["A", "C"], None)), ("B. aspirin", (["B"], None)),
    ("I think so", (None, "no_answer")), ("答案为F", (None, "unknown_letter")), ("", (None, "no_answer")),
])
def test_extract_letters(text, expected):
    assert M.extract_letters(text, "ABCDE") == expected


def test_mcq_scores_multi_answer_needs_exactly_the_gold_set():
    items = [{"answer": ["A"], "subject": "内科"}, {"answer": ["B", "C"], "subject": "外科"},
             {"answer": ["B", "C"], "subject": "外科"}, {"answer": ["D"]}, {"answer": []}]
    preds = [["A"], ["B", "C"], ["B"], None, ["A"]]
    s = M.mcq_scores(items, preds)
    assert s["n"] == 4 and s["unlabeled"] == 1 and s["invalid"] == 1
    assert s["acc"] == pytest.approx(2 / 4)
    assert s["acc_multi"] == pytest.approx(1 / 2)
    assert s["subjects"] == {"内科": {"n": 1, "acc": 1.0}, "外科": {"n": 2, "acc": 0.5}}
    from sklearn.metrics import f1_score

    assert s["f1_weighted"] == pytest.approx(f1_score(["A", "BC", "BC", "D"], ["A", "BC", "B", "-"], average="weighted"))
    with pytest.raises(ValueError, match="no item has a gold answer"):
        M.mcq_scores([{"answer": []}], [["A"]])


def test_promptcblue_scoring_per_task_type():
    rows = [
        {"task_dataset": "CMeEE-V2", "task_type": "ner", "answer_choices": ["疾病", "症状"],
         "target": "上述句子中的实体包含：\n疾病实体：偏头痛，高血压\n症状实体：头痛"},
        {"task_dataset": "CHIP-CDN", "task_type": "normalization", "answer_choices": ["偏头痛", "紧张型头痛"],
         "target": "偏头痛，紧张型头痛"},
        {"task_dataset": "KUAKE-QIC", "task_type": "cls", "answer_choices": ["病情诊断", "治疗方案"], "target": "治疗方案"},
        {"task_dataset": "KUAKE-QIC", "task_type": "cls", "answer_choices": ["病情诊断", "治疗方案"], "target": "病情诊断"},
        {"task_dataset": "MedDG", "task_type": "response_generation", "answer_choices": None, "target": "建议多喝水休息"},
    ]
    outputs = ["上述句子中的实体包含：\n疾病实体：偏头痛\n症状实体：头痛，恶心",  # tp 2, fp 1, fn 1
               "偏头痛，不存在的词",  # "不存在的词" is not a choice: dropped
               "治疗方案", "治疗方案", "建议多喝水"]
    s = M.promptcblue_scores(rows, outputs)
    t = s["tasks"]
    assert t["CMeEE-V2"] == {"metric": "micro_f1", "score": pytest.approx(2 / 3), "n": 1}
    assert t["CHIP-CDN"]["score"] == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert t["KUAKE-QIC"]["metric"] == "macro_f1"
    assert t["KUAKE-QIC"]["score"] == pytest.approx((0 + 2 / 3) / 2)
    assert t["MedDG"]["metric"] == "rougeL"
    assert t["MedDG"]["score"] == pytest.approx(2 * 1 * (5 / 7) / (1 + 5 / 7))
    assert s["score"] == pytest.approx(sum(v["score"] for v in t.values()) / 4)


def test_judge_reply_parsing_is_strict():
    ok = '```json\n{"fluency": 4, "relevance": 5, "completeness": 3, "proficiency": 2}\n```'
    assert M.parse_judge_scores(ok) == {"fluency": 4, "relevance": 5, "completeness": 3, "proficiency": 2}
    for bad in ("good answer, 5/5", '{"fluency": 6, "relevance": 5, "completeness": 3, "proficiency": 2}',
                '{"fluency": 4, "relevance": 5}', '{"fluency": 4.5, "relevance": 5, "completeness": 3, "proficiency": 2}',
                ok + ok, None):
        assert M.parse_judge_scores(bad) is None, bad
    assert M.parse_pairwise("Win") == "win" and M.parse_pairwise("verdict: TIE.") == "tie"
    assert M.parse_pairwise("win or lose") is None and M.parse_pairwise("Winner") is None
