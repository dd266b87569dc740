"""Metrics: tokenisation, BLEU/ROUGE through sacrebleu / rouge-score, mcq scoring, answer
extraction, PromptCBLUE per-task scoring, judge reply parsing."""
from __future__ import annotations

import pytest

from medpipe.stages.evaluation import cblue, metrics as M


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
    # 患者三天 is the longest common subsequence, 患者/三天 the shared bigrams of 5, 4 of 6 unigrams
    assert ch["rougeL"] == pytest.approx(4 / 6) and ch["rouge2"] == pytest.approx(2 / 5)
    assert ch["bleu1"] == pytest.approx(4 / 6)
    from sacrebleu.metrics import BLEU

    assert ch["bleu4"] == pytest.approx(BLEU(tokenize="zh").corpus_score(["患者发热三天"], [["患者咳嗽三天"]]).score / 100)


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
    s = cblue.promptcblue_scores(rows, outputs)
    t = s["tasks"]
    assert t["CMeEE-V2"] == {"metric": "micro_f1", "score": pytest.approx(2 / 3), "n": 1}
    assert t["CHIP-CDN"]["score"] == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert t["KUAKE-QIC"]["metric"] == "macro_f1"
    assert t["KUAKE-QIC"]["score"] == pytest.approx((0 + 2 / 3) / 2)
    assert t["MedDG"]["metric"] == "rougeL"
    assert t["MedDG"]["score"] == pytest.approx(2 * 1 * (5 / 7) / (1 + 5 / 7))
    assert s["score"] == pytest.approx(sum(v["score"] for v in t.values()) / 4)


def test_promptcblue_cmedcausal_triples_with_nested_condition_tails():
    gold = ("因果关系三元组如下：\n头实体：吸烟；尾实体：肺癌\n头实体：高血压；尾实体：脑卒中\n"
            "条件关系三元组如下：\n头实体：长期服用；尾三元组：头实体：阿司匹林；尾实体：胃出血；关系：因果关系")
    pred = ("因果关系三元组如下：\n头实体：吸烟；尾实体：肺癌\n头实体：糖尿病；尾实体：肾病\n"
            "头实体：乱码没有尾实体\n"                                                # unparseable: skipped
            "条件关系三元组如下：\n头实体：长期服用；尾三元组：头实体：阿司匹林；尾实体：胃出血；关系：因果关系")
    g, p = cblue.cblue_structure("CMedCausal", gold), cblue.cblue_structure("CMedCausal", pred)
    assert len(g) == 3 and len(p) == 3 and len(g & p) == 2  # the nested tail matches as a whole
    nested = next(t for t in g if "条件关系" in t[1])
    assert '"subject": "阿司匹林"' in nested[0] and nested[2] == '"长期服用"'
    assert cblue.cblue_structure("CMedCausal", "给定的文本没有指定关系的三元组") == set()
    s = cblue.promptcblue_scores([{"task_dataset": "CMedCausal", "task_type": "causal", "target": gold}], [pred])
    assert s["tasks"]["CMedCausal"] == {"metric": "micro_f1", "score": pytest.approx(2 / 3), "n": 1}


def test_promptcblue_text2dt_tree_edit_ratio_by_hand():
    from medpipe.stages.evaluation.text2dt import build_tree, parse_text2dt

    gold = ("根据给定的指南文本抽取的诊疗决策树如下：\n"
            "条件节点：role=C；logical_rel=and；triples=[('患者', '临床表现', '发热'), ('患者', '临床表现', '咳嗽')]\n"
            "决策节点：role=D；logical_rel=null；triples=[('患者', '治疗药物', '奥司他韦')]\n"
            "决策节点：role=D；logical_rel=null；triples=[('患者', '治疗方案', '观察')]")
    nodes = parse_text2dt(gold)
    assert [n["role"] for n in nodes] == ["C", "D", "D"] and len(build_tree(nodes).children) == 2
    # a lone decision node carrying the root's first triple:
    #   node distance to the root: role 1 + logical_rel 1 + triples {fever} ^ {fever, cough} 1 = 3;
    #   the gold root's two leaves against an empty node: (role 1 + 1 triple) × 2 = 4  -> 7
    #   largest distance: pred 1 triple + 2·1 node = 3; gold 4 triples + 2·3 nodes = 10  -> 13
    pred = "决策节点：role=D；logical_rel=null；triples=[('患者', '临床表现', '发热')]\n乱码行"
    rows = [{"task_dataset": "Text2DT", "task_type": "tree", "target": gold}] * 2
    s = cblue.promptcblue_scores(rows, [gold, pred])
    assert s["tasks"]["Text2DT"]["metric"] == "tree_lenv_ratio"
    assert s["tasks"]["Text2DT"]["score"] == pytest.approx(1 - (0 + 7) / (10 + 10 + 3 + 10))
    # triples compare lowercased; an incomplete condition node is a leaf (and so its ancestors)
    assert parse_text2dt("x：role=D；logical_rel=null；triples=[('A', 'B', 'C')]")[0]["triples"] == {("a", "b", "c")}
    assert build_tree(parse_text2dt("a：role=C；triples=[]\nb：role=C；triples=[]\nc：role=D\nd：role=D")).children == []
    assert parse_text2dt("") == [{"role": "D", "logical_rel": "null", "triples": frozenset()}]


def test_judge_reply_parsing_is_strict():
    ok = '```json\n{"fluency": 4, "relevance": 5, "completeness": 3, "proficiency": 2}\n```'
    assert M.parse_judge_scores(ok) == {"fluency": 4, "relevance": 5, "completeness": 3, "proficiency": 2}
    for bad in ("good answer, 5/5", '{"fluency": 6, "relevance": 5, "completeness": 3, "proficiency": 2}',
                '{"fluency": 4, "relevance": 5}', '{"fluency": 4.5, "relevance": 5, "completeness": 3, "proficiency": 2}',
                ok + ok, None):
        assert M.parse_judge_scores(bad) is None, bad
    assert M.parse_pairwise("Win") == "win" and M.parse_pairwise("verdict: TIE.") == "tie"
    assert M.parse_pairwise("win or lose") is None and M.parse_pairwise("Winner") is None
