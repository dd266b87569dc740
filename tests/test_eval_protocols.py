"""Evaluation protocols named after harnesses (stages/evaluation/protocols/): the exact prompts they
build, written down here from each harness's own files (cited per test), their answer extractors
on the authors' answer shapes, and — when lm-eval is installed — per-item parity with lm_eval
itself on the tiny model and the bundled MedQA / MedMCQA / PubMedQA samples."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from _evalrun import samples, tiny_artifact
from medpipe.stages.eval import EvalParams
from medpipe.stages.evaluation.protocols import cmexam, lmeval, medcare, opencompass as oc
from medpipe.stages.evaluation.runner import evaluate

QUIET = dict(say=lambda m: None)
# MMLU as released (hendrycks/test data/{test,dev}/<subject>_<split>.csv, no header), a few items
MMLU = str(Path(__file__).parent / "fixtures" / "formats" / "mmlu" / "data")
EN = {"id": "e1", "question": "Which drug lowers blood pressure?", "context": None,
      "options": {"A": "Amlodipine", "B": "Insulin", "C": "Heparin", "D": "Aspirin"}, "answer": ["A"]}
ZH = {"id": "z1", "question": "高血压首选药物是", "context": None, "subject": "clinical_medicine",
      "options": {"A": "氨氯地平", "B": "胰岛素", "C": "肝素", "D": "阿司匹林"}, "answer": ["A"]}
PQA = {"id": "p1", "question": "Does aspirin help?", "context": "Aspirin was given.\nPain fell.",
       "options": {"A": "yes", "B": "no", "C": "maybe"}, "answer": ["A"]}


# --- golden prompts -------------------------------------------------------------------------------
def test_lm_eval_prompts():
    # lm_eval/tasks/medqa/preprocess_medqa.py (0.4.13): f"Question: {sent1}\n" + "A. ..\n" x4 + "Answer:"
    assert lmeval.doc_to_text(EN, "medqa") == ("Question: Which drug lowers blood pressure?\nA. Amlodipine\n"
                                               "B. Insulin\nC. Heparin\nD. Aspirin\nAnswer:")
    # lm_eval/tasks/medmcqa/utils_medmcqa.py: "Question: " + q + "\nChoices:\n" + "A. ..\n" x4 + "Answer:"
    assert lmeval.doc_to_text(EN, "medmcqa") == ("Question: Which drug lowers blood pressure?\nChoices:\n"
                                                 "A. Amlodipine\nB. Insulin\nC. Heparin\nD. Aspirin\nAnswer:")
    # lm_eval/tasks/pubmedqa/preprocess_pubmedqa.py: "Abstract: {contexts}\nQuestion: {q}\nAnswer:", choices yes/no/maybe
    assert lmeval.doc_to_text(PQA, "pubmedqa") == "Abstract: Aspirin was given.\nPain fell.\nQuestion: Does aspirin help?\nAnswer:"
    assert lmeval.choices(PQA, "pubmedqa") == [("A", "yes"), ("B", "no"), ("C", "maybe")]
    # lm_eval/tasks/ceval/_default_ceval_yaml + _generate_configs.py, 1-shot (api/task.py fewshot_context:
    # description + shot + " " + gold + "\n\n" + doc); C-Eval shots are the first k of dev (first_n)
    shot = {**ZH, "question": "糖尿病首选药物是", "options": {"A": "胰岛素", "B": "二甲双胍", "C": "肝素", "D": "华法林"},
            "answer": ["B"]}
    assert lmeval.context_text(ZH, "ceval", [shot]) == (
        "以下是中国关于临床医学的单项选择题，请选出其中的正确答案。\n\n"
        "糖尿病首选药物是\nA. 胰岛素\nB. 二甲双胍\nC. 肝素\nD. 华法林\n答案： B\n\n"
        "高血压首选药物是\nA. 氨氯地平\nB. 胰岛素\nC. 肝素\nD. 阿司匹林\n答案：")
    with pytest.raises(ValueError, match="unknown medical subject 'ceval'"):
        lmeval.description({**ZH, "subject": "ceval"}, "ceval")
    # lm_eval/tasks/cmmlu/_default_template_yaml + _generate_configs.py: C-Eval's item text, another description
    cm = {**ZH, "subject": None, "task": "cmmlu_anatomy"}
    assert lmeval.context_text(cm, "ceval", []) == ("以下是关于解剖学的单项选择题，请直接给出正确答案的选项。\n\n"
                                                    "高血压首选药物是\nA. 氨氯地平\nB. 胰岛素\nC. 肝素\nD. 阿司匹林\n答案：")


def test_lm_eval_mmlu_prompt():
    # lm_eval/tasks/mmlu/default/_default_template_yaml (doc_to_text "{{question.strip()}}\nA. {{choices[0]}}\n..
    # D. {{choices[3]}}\nAnswer:", choices A-D, fewshot_split dev, sampler first_n) + mmlu_clinical_knowledge.yaml
    # (description "The following are multiple choice questions (with answers) about clinical knowledge.\n\n")
    from medpipe.stages.evaluation.sets import plan_sets

    [s] = plan_sets(EvalParams(data=f"{MMLU}/test/clinical_knowledge_test.csv", limit=3))
    [shot, _] = plan_sets(EvalParams(data=f"{MMLU}/dev/clinical_knowledge_dev.csv"))[0].records
    assert s.fmt == "mmlu" and lmeval.pick_shots(s.records[:1], [shot, _], 1, "mmlu") == [[shot]]
    assert lmeval.context_text(s.records[2], "mmlu", [shot]) == (
        "The following are multiple choice questions (with answers) about clinical knowledge.\n\n"
        "Glycolysis is the name given to the pathway involving the conversion of:\nA. glycogen to glucose-1-phosphate."
        "\nB. glycogen or glucose to fructose.\nC. glycogen or glucose to pyruvate or lactate.\nD. glycogen or glucose "
        "to pyruvate or acetyl CoA.\nAnswer: C\n\n"
        "Which of the following is true about a patient's pulse, when measured at the radial artery?\n(Select the "
        "single best answer.)\nA. It cannot be felt in adults\nB. It is found on the little-finger side\nC. It is "
        "found on the thumb side of the wrist\nD. It reflects venous pressure\nAnswer:")
    assert lmeval.choices(s.records[0], "mmlu") == [("A", "A"), ("B", "B"), ("C", "C"), ("D", "D")]


def test_lm_eval_prompts_equal_lm_evals_own_functions():
    """The bundled samples through medpipe's reader vs lm-eval's own doc_to_text on the HF fields."""
    pytest.importorskip("lm_eval", reason="lm-eval not installed (the Makefile installs lm-eval[hf]==0.4.13)")
    from lm_eval.tasks.medmcqa.utils_medmcqa import doc_to_text as medmcqa_text
    from lm_eval.tasks.medqa.preprocess_medqa import doc_to_text as medqa_text
    from lm_eval.tasks.pubmedqa.preprocess_pubmedqa import doc_to_text as pubmedqa_text

    from medpipe.stages.evaluation.sets import plan_sets

    s = samples()
    medqa = [json.loads(x) for x in open(f"{s}/mcq_medqa.jsonl", encoding="utf-8")]
    ours = plan_sets(EvalParams(data={"path": f"{s}/mcq_medqa.jsonl", "format": "medqa"}))[0].records
    for raw, rec in zip(medqa, ours):
        hf = {"sent1": raw["question"], **{f"ending{i}": raw["options"][k] for i, k in enumerate("ABCD")}}
        assert lmeval.doc_to_text(rec, "medqa") == medqa_text(hf)
    mm = [json.loads(x) for x in open(f"{s}/medmcqa.json", encoding="utf-8")]
    ours = plan_sets(EvalParams(data={"path": f"{s}/medmcqa.json", "format": "medmcqa"}))[0].records
    assert [lmeval.doc_to_text(r, "medmcqa") for r in ours] == [medmcqa_text(raw) for raw in mm]
    pq = json.load(open(f"{s}/pubmedqa.json", encoding="utf-8"))
    ours = plan_sets(EvalParams(data={"path": f"{s}/pubmedqa.json", "format": "pubmedqa"}))[0].records
    assert [lmeval.doc_to_text(r, "pubmedqa") for r in ours] == [pubmedqa_text(v) for v in pq.values()]


def test_lm_eval_encodes_the_pair_whole_and_splits_it():
    """api/model.py _encode_pair: the context's trailing space moves into the continuation, and the
    continuation is encode(ctx + cont)[len(encode(ctx)):]."""
    from medpipe.stages.models.loader import load_tokenizer

    tok = load_tokenizer(tiny_artifact().tokenizer_path)
    ctx, cont = lmeval.encode_pair(tok, "答案： ", "B")
    assert ctx == tok.encode("答案：") and cont == tok.encode("答案： B")[len(ctx):]
    # the byte-level fast path (only the context's last two pre-tokens re-encoded with each choice)
    # gives what encoding the whole text does, on every bundled item, plain and chat, and on
    # boundaries where the pre-tokens change (a context ending in "\n", a choice starting with one)
    from medpipe.stages.evaluation.sets import plan_sets

    data = [{"path": f"{samples()}/mcq_medqa.jsonl", "format": "medqa"}, {"path": f"{MMLU}/test", "format": "mmlu"},
            {"path": f"{samples()}/pubmedqa.json", "format": "pubmedqa"},
            {"path": f"{samples()}/ceval_val.csv", "format": "ceval", "task": "ceval_clinical_medicine"}]
    pairs = []
    for st in plan_sets(EvalParams(data=data)):
        for chat in (False, True):
            ctxs = [lmeval.context_text(it, st.fmt, [], tok, chat) for it in st.records]
            pairs += [(c, ("" if chat else " ") + t) for c, it in zip(ctxs, st.records) for _, t in lmeval.choices(it, st.fmt)]
            pairs += [(c + "\n", "x y") for c in ctxs[:3]] + [(c, "\n答案") for c in ctxs[:3]]
    assert lmeval._tail_split(tok, [pairs[0][0]], None)             # the tiny Qwen2 tokenizer takes the fast path
    naive = []
    for c, k in pairs:
        c, k = (c.rstrip(), c[len(c.rstrip()):] + k)
        naive.append((tok(c)["input_ids"], tok(c + k)["input_ids"][len(tok(c)["input_ids"]):]))
    assert lmeval.encode_pairs(tok, pairs) == naive and len(pairs) > 900
    # api/samplers.py: one Random(1234) per task drawing `sample(pool, k)` doc after doc; C-Eval first_n
    import random

    pool = [EN, ZH, PQA]
    rnd = random.Random(1234)
    assert lmeval.pick_shots([EN, EN], pool, 2, "medqa") == [rnd.sample(pool, 2), rnd.sample(pool, 2)]
    # C-Eval / CMMLU: the first k dev items of the item's own subject (one dev split per subject task)
    dev = [{**ZH, "id": f"{s}{i}", "subject": s} for s in ("basic_medicine", "clinical_medicine") for i in range(3)]
    assert [e["id"] for e in lmeval.pick_shots([ZH], dev, 2, "ceval")[0]] == ["clinical_medicine0", "clinical_medicine1"]


def test_opencompass_prompts():
    # configs/datasets/MedQA/MedQA_gen_3bf756.py (QUERY_TEMPLATE, .strip()ped; choices end with "\n")
    assert oc.render(EN, "medqa", [], None, chat=False) == (
        "Answer the following multiple choice question. The last line of your response should be of the following "
        "format: 'ANSWER: $LETTER' (without quotes) where LETTER is one of Options(e.g. one of ABCDEFGHIJKLMNOP). "
        "Think step by step before answering.\n\nQuestion:\n\nWhich drug lowers blood pressure?\n\nOptions:\n\n"
        "A. Amlodipine\nB. Insulin\nC. Heparin\nD. Aspirin\n")
    # configs/datasets/medmcqa/medmcqa_gen_60c8f5.py: SYSTEM 'You are a helpful medical assistant.\n\n' merged
    # into the HUMAN turn with '\n'; datasets/medmcqa.py builds question + "\n" + "A. .." lines
    assert oc.render(EN, "medmcqa", [], None, chat=False) == (
        "You are a helpful medical assistant.\n\n\nQ: Which drug lowers blood pressure?\nA. Amlodipine\nB. Insulin\n"
        "C. Heparin\nD. Aspirin\n Please select the correct answer from the options above and output only the "
        "corresponding letter (A, B, C, D, or E) without any explanation or additional text.\n")
    # configs/datasets/ceval/ceval_gen_5f30c7.py, base model: header in every shot, BOT '{answer}', joined by "\n"
    shot = {**ZH, "answer": ["A"]}
    assert oc.render(ZH, "ceval", [shot], None, chat=False) == (
        "以下是中国关于临床医学考试的单项选择题，请选出其中的正确答案。\n高血压首选药物是\nA. 氨氯地平\nB. 胰岛素\nC. 肝素\n"
        "D. 阿司匹林\n答案: \nA\n"
        "以下是中国关于临床医学考试的单项选择题，请选出其中的正确答案。\n高血压首选药物是\nA. 氨氯地平\nB. 胰岛素\nC. 肝素\n"
        "D. 阿司匹林\n答案: ")
    # configs/datasets/cmmlu/cmmlu_gen_c13365.py, base model: "题目：", BOT '答案是: {answer}' kept blank at the end
    cm = {**ZH, "task": "cmmlu_anatomy"}
    assert oc.render(cm, "ceval", [cm], None, chat=False) == (
        "以下是关于解剖学的单项选择题，请直接给出正确答案的选项。\n题目：高血压首选药物是\nA. 氨氯地平\nB. 胰岛素\nC. 肝素\n"
        "D. 阿司匹林\n答案是: A\n"
        "以下是关于解剖学的单项选择题，请直接给出正确答案的选项。\n题目：高血压首选药物是\nA. 氨氯地平\nB. 胰岛素\nC. 肝素\n"
        "D. 阿司匹林\n答案是: ")
    # configs/datasets/cmb/cmb_gen_dfb5c4.py: single-character options dropped, ' \n 答案: '
    cmb = {"question": "下列哪项正确", "options": {"A": "发热", "B": "咳嗽", "C": "X", "D": "乏力"}, "exam_type": "医师考试",
           "exam_class": "执业医师", "question_type": "多项选择题"}
    assert oc.render(cmb, "cmb", [], None, chat=False) == (
        "以下是中国医师考试中执业医师考试的一道多项选择题，不需要做任何分析和解释，直接输出答案选项。\n下列哪项正确\n"
        "A. 发热\nB. 咳嗽\nD. 乏力 \n 答案: ")


def test_opencompass_extractors_on_answer_shapes():
    # utils/text_postprocessors.py @a5acc4bb, behaviour as the functions give it
    assert oc.first_capital("答案：B") == "B" and oc.first_capital("Answer: B") == "A"
    assert oc.first_capital(" the answer is c") == ""
    assert oc.first_option("答案是 C。", "ABCD") == "C" and oc.first_option("ANSWER: D", "ABCD") == "D"
    assert oc.first_option("故选B", "ABCD") == "B"                       # pattern 13 选择?\s*([ABCD])
    assert oc.first_option("解析：1. 首先考虑D，排除B，然后A", "ABCD") == "A"  # 1.\s?(.*?)$ : first letter in option order
    assert oc.first_option("Let's think. D is wrong. A is right", "ABCD") == "D"
    assert oc.first_option("The answer is 1", "ABCD") == "" and oc.first_option("选择题答案如下", "ABCD") == ""
    assert oc.multiple_select("答案：B、D") == "BD" and oc.multiple_select("B. CT检查") == "BCT"
    assert oc.medmcqa_cleansing("I understand. The answer is B.") == "B"
    assert oc.medmcqa_cleansing("CT shows nothing") == ""                # \b: 'CT' is not C


def test_medcare_prompts_and_scorer():
    # medcare/eval/model_diverse_gen_batch.py: question + TASK ({answer} literal), conv_qwen system prompt
    assert medcare.user_turn(EN, "en") == (
        "Which drug lowers blood pressure?\nA. Amlodipine\nB. Insulin\nC. Heparin\nD. Aspirin\n\n"
        "Please format the final answer at the end of the response as: The answer is {answer}.")
    assert medcare.user_turn(ZH, "zh").endswith("D. 阿司匹林\n\n请在回答的最后用以下格式回答：答案为{answer}。")
    assert medcare.SYSTEM == "You are a helpful assistant."
    # the cue: " " after a final ".", else ". "; "The answer is" in the prompt is checked first
    assert medcare.sep_of("It is B.") == " " and medcare.sep_of("所以选B。") == ". "
    assert medcare.cue_of("...The answer is {answer}.") == "\nThe answer is " and medcare.cue_of("答案为") == "\n答案为"
    # medcare/eval/eval_em.py on the authors' answer shapes
    zh = medcare.medcare_zh_correct
    assert zh("…所以选B。. \n答案为 B", "B") and not zh("…. \n答案为 BC", "B")
    assert zh("分析。. \n答案为 A", "ACD") is False                      # one forced letter: a multi-answer item is wrong
    assert zh("A对 B错 C对 D对", "ACD") and not zh("A对 B对 C对 D对", "ACD")  # judgement fallback (no 答案为)
    assert not zh("分析\n\n\n结论. \n答案为 B", "B")     # an output with "\n\n\n": cut there, the cue line is gone
    en = medcare.medcare_en_correct
    assert en("the answer is B. \nThe answer is  B", "B") and en("x. \nThe answer is  B or C", "B")
    assert not en("x. \nThe answer is  B or C", "BD") and not en("no cue", "B")


def test_cmexam_prompt_and_scorer():
    # src/preprocess/prompt_templates.py prompt 1 + src/LoRA/templates/med_template.json
    item = {"question": "高血压首选药物是", "options": {"A": "氨氯地平 片", "B": "CT检查"}}
    assert cmexam.LORA_TEMPLATE.format(instruction=cmexam.prompt_of(item)) == (
        "问题: 高血压首选药物是, \n 选项: A 氨氯地平 片\nB CT检查\n### 回答:\n")
    # src/evaluation/evaluate_lora_result.py parse_options: substring letters or the option's first word
    opts = "A 氨氯地平 片\nB CT检查\nC 肝素\nD 华法林"
    assert cmexam.parse_options("答案: B. CT检查", opts) == "BC"      # 'C' of CT counts, as in the original
    assert cmexam.parse_options("氨氯地平", opts) == "A"
    assert cmexam.parse_options("答案: D\n解释: 肝素无效", opts) == "D"  # first line only when 解释 appears
    assert cmexam.parse_options("不知道", opts) == "无答案" and cmexam.parse_options("", opts) == "无答案"


# --- the protocols in the eval stage ----------------------------------------------------------------
def test_protocols_run_and_record_per_item_details(tmp_path):
    data = [{"path": f"{samples()}/mcq_medqa.jsonl", "format": "medqa", "limit": 4},
            {"path": f"{samples()}/pubmedqa.json", "format": "pubmedqa", "limit": 4}]
    metrics, results = evaluate(EvalParams(data=data, protocol="lm-eval"), tiny_artifact(), tmp_path / "l", **QUIET)
    rows = [json.loads(x) for x in (tmp_path / "l" / "details" / "pubmedqa.jsonl").read_text().splitlines()]
    assert results["pubmedqa"]["protocol"] == "lm-eval"
    for r in rows:  # every choice's log-likelihood, tokens and characters; acc_norm divides by characters
        assert r["chars"] == {"A": 3, "B": 2, "C": 5} and set(r["n_tokens"]) == {"A", "B", "C"}
        assert r["pred"] == [max(r["scores"], key=r["scores"].get)]
        assert r["pred_norm"] == [max(r["scores"], key=lambda k: r["scores"][k] / r["chars"][k])]
    assert metrics["pubmedqa/acc_norm"] == sum(r["pred_norm"] == r["gold"] for r in rows) / 4
    for proto, fmt in (("opencompass", "medqa"), ("medcare", "medqa")):
        m, res = evaluate(EvalParams(data=data[0], protocol=proto, max_new_tokens=4), tiny_artifact(), tmp_path / proto,
                          **QUIET)
        rows = [json.loads(x) for x in (tmp_path / proto / "details" / "medqa.jsonl").read_text().splitlines()]
        assert res["medqa"]["protocol"] == proto and all(r["protocol"] == proto and "text" in r for r in rows)
        assert m["medqa/acc"] == sum(r["correct"] for r in rows) / 4
    from medpipe.errors import ConfigError

    with pytest.raises(ConfigError, match="protocol cmexam has no task for format 'medqa'"):
        evaluate(EvalParams(data=data[0], protocol="cmexam"), tiny_artifact(), tmp_path / "x", **QUIET)


def test_lm_eval_task_names_map_to_local_files(tmp_path, monkeypatch):
    """data=medqa_4options / multimedqa under protocol=lm-eval: the published file names under data_dir."""
    from medpipe.errors import ConfigError
    from medpipe.stages.evaluation.sets import plan_sets

    (tmp_path / "medqa_4options").mkdir()
    (tmp_path / "medqa_4options" / "phrases_no_exclude_test.jsonl").symlink_to(f"{samples()}/mcq_medqa.jsonl")
    (tmp_path / "dev.json").symlink_to(f"{samples()}/medmcqa.json")
    (tmp_path / "pqal_test_set.json").symlink_to(f"{samples()}/pubmedqa.json")
    (tmp_path / "test").symlink_to(f"{MMLU}/test")   # MMLU's data/test/<subject>_test.csv
    sets = plan_sets(EvalParams(data="multimedqa", protocol="lm-eval", data_dir=str(tmp_path), limit=3))
    mmlu = ["anatomy", "clinical_knowledge", "college_medicine", "medical_genetics", "professional_medicine",
            "college_biology"]                       # multimedqa.yaml's MMLU subjects, its order
    assert [(s.name, s.fmt, len(s.records)) for s in sets] == [
        ("pubmedqa", "pubmedqa", 3), ("medmcqa", "medmcqa", 3), ("medqa_4options", "medqa", 3),
        ("mmlu_anatomy", "mmlu", 3), ("mmlu_clinical_knowledge", "mmlu", 3), ("mmlu_college_medicine", "mmlu", 2),
        ("mmlu_medical_genetics", "mmlu", 2), ("mmlu_professional_medicine", "mmlu", 2),
        ("mmlu_college_biology", "mmlu", 2)]
    assert sets[3].records[0]["_loc"] == f"{tmp_path}/test/anatomy_test.csv:1"
    # the group's score is lm-eval's: acc averaged over items (weight_by_size), not over tasks
    metrics, results = evaluate(EvalParams(data="multimedqa", protocol="lm-eval", data_dir=str(tmp_path)),
                                tiny_artifact(), tmp_path / "out", **QUIET)
    tasks = ("pubmedqa", "medmcqa", "medqa_4options", *(f"mmlu_{x}" for x in mmlu))
    assert [results[t]["n"] for t in tasks] == [40, 40, 60, 6, 3, 2, 2, 2, 2]
    assert metrics["multimedqa/acc"] == pytest.approx(sum(metrics[f"{t}/acc"] * results[t]["n"] for t in tasks) / 157)
    # a recipe composed with data=public names the splits: those win over data_dir
    named = {"medqa_test": {"path": f"{samples()}/mcq_medqa.jsonl", "format": "medqa"}}
    sets = plan_sets(EvalParams(data="medqa_4options", protocol="lm-eval", limit=2), named)
    assert [(s.name, s.records[0]["_loc"]) for s in sets] == [("medqa_4options", f"{samples()}/mcq_medqa.jsonl:1")]
    monkeypatch.delenv("MEDPIPE_EVAL_DATA", raising=False)
    with pytest.raises(ConfigError, match="lm-eval task medqa_4options: no phrases_no_exclude_test.jsonl"):
        plan_sets(EvalParams(data="medqa_4options", protocol="lm-eval"))


def test_ceval_and_cmmlu_task_names_map_to_local_files(tmp_path, monkeypatch):
    """data=ceval-valid_<subject> → val/<subject>_val.csv (ceval-exam.zip); data=cmmlu_<subject> →
    test/<subject>.csv (haonan-li/CMMLU, header ",Question,A,B,C,D,Answer", columns renamed); the
    subject (and so lm-eval's description) from the task name; shots from the dev split given."""
    from medpipe.errors import ConfigError
    from medpipe.stages.evaluation.sets import plan_sets

    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "clinical_medicine_val.csv").symlink_to(f"{samples()}/ceval_val.csv")
    (tmp_path / "test").mkdir()
    import csv

    with open(f"{samples()}/ceval_val.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))[1:4]
    with open(tmp_path / "test" / "anatomy.csv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([["", "Question", "A", "B", "C", "D", "Answer"], *rows])
    sets = plan_sets(EvalParams(data=["ceval-valid_clinical_medicine", "cmmlu_anatomy"], protocol="lm-eval",
                                data_dir=str(tmp_path), limit=2))
    assert [(s.name, s.fmt, len(s.records)) for s in sets] == [("ceval-valid_clinical_medicine", "ceval", 2),
                                                               ("cmmlu_anatomy", "ceval", 2)]
    cm = sets[1].records[0]
    assert (cm["question"], cm["answer"], cm["task"]) == (rows[0][1], [rows[0][6]], "cmmlu_anatomy")
    assert lmeval.context_text(cm, "ceval", []).startswith("以下是关于解剖学的单项选择题，请直接给出正确答案的选项。\n\n")
    ce = sets[0].records[0]
    assert lmeval.context_text(ce, "ceval", []).startswith("以下是中国关于临床医学的单项选择题，请选出其中的正确答案。\n\n")
    metrics, _ = evaluate(EvalParams(data="cmmlu_anatomy", protocol="lm-eval", data_dir=str(tmp_path), shots=1,
                                     fewshot_data={"path": f"{samples()}/ceval_dev.csv", "task": "cmmlu_anatomy"}),
                          tiny_artifact(), tmp_path / "out", **QUIET)
    assert set(metrics) == {"cmmlu_anatomy/acc", "cmmlu_anatomy/acc_norm", "cmmlu_anatomy/f1_weighted"}
    monkeypatch.delenv("MEDPIPE_EVAL_DATA", raising=False)
    with pytest.raises(ConfigError) as e:
        plan_sets(EvalParams(data="ceval-valid_physician", protocol="lm-eval", data_dir=str(tmp_path)))
    assert str(e.value) == (f"lm-eval task ceval-valid_physician: no physician_val.csv (looked for "
                            f"{tmp_path}/ceval-valid_physician/physician_val.csv, {tmp_path}/physician_val.csv, "
                            f"{tmp_path}/val/physician_val.csv); or give data={{path: ..., format: ceval, "
                            f"task: ceval-valid_physician}}")
    with pytest.raises(ConfigError, match="lm-eval task cmmlu_virology: no virology.csv .*DIR/test/virology.csv"):
        plan_sets(EvalParams(data="cmmlu_virology", protocol="lm-eval"))


def test_medpipe_eval_takes_a_protocol(tmp_path):
    from _evalrun import fake_run
    from conftest import medpipe

    run_dir = fake_run(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "pqal_test_set.json").symlink_to(f"{samples()}/pubmedqa.json")
    r = medpipe("eval", str(run_dir), "--stage", "sft", "protocol=lm-eval", "data=pubmedqa",
                f"data_dir={tmp_path / 'd'}", "limit=3")
    assert r.code == 0, r.out
    rec = json.loads((run_dir / "eval" / "sft.json").read_text())
    assert set(rec["metrics"]) == {"pubmedqa@lm-eval/acc", "pubmedqa@lm-eval/acc_norm", "pubmedqa@lm-eval/f1_weighted"}
    assert rec["results"]["pubmedqa@lm-eval"]["protocol"] == "lm-eval"
    r = medpipe("eval", str(run_dir), "protocol=helm", "data=cmexam")
    assert r.code == 2 and "protocol must be one of native, lm-eval, opencompass, medcare, cmexam" in r.out


# --- parity with lm-eval itself ---------------------------------------------------------------------
@pytest.mark.slow
def test_lm_eval_protocol_equals_lm_eval_per_item(tmp_path, monkeypatch):
    """protocol=lm-eval vs `lm_eval` 0.4.13 run on the same local files (tasks written by
    protocols/lmeval_tasks.py, prompts = lm-eval's own functions), tiny model, fp32: the same
    prediction (acc and acc_norm) for every item and every choice's log-likelihood within 1e-4."""
    pytest.importorskip("lm_eval", reason="lm-eval not installed (the Makefile installs lm-eval[hf]==0.4.13)")
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    from medpipe.stages.evaluation.protocols.lmeval_tasks import write_tasks

    s = samples()
    files = {"medqa_4options": (f"{s}/mcq_medqa.jsonl", "medqa"), "medmcqa": (f"{s}/medmcqa.json", "medmcqa"),
             "pubmedqa": (f"{s}/pubmedqa.json", "pubmedqa"),
             "mmlu_anatomy": (f"{MMLU}/test/anatomy_test.csv", "mmlu"),
             "mmlu_clinical_knowledge": (f"{MMLU}/test/clinical_knowledge_test.csv", "mmlu")}
    names = write_tasks(tmp_path / "tasks", {t: f for t, (f, _) in files.items()})
    ref = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tiny_artifact().model_path},dtype=float32",
                                  tasks=names, batch_size=8, device="cpu", log_samples=True,
                                  task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    data = [{"path": f, "format": fmt, "task": t} for t, (f, fmt) in files.items()]
    metrics, _ = evaluate(EvalParams(data=data, protocol="lm-eval"), tiny_artifact(), tmp_path / "mp", **QUIET)
    worst = 0.0
    for task, name in zip(files, names):
        theirs = sorted(ref["samples"][name], key=lambda r: r["doc_id"])
        ours = [json.loads(x) for x in (tmp_path / "mp" / "details" / f"{task}.jsonl").read_text().splitlines()]
        assert len(ours) == len(theirs) > 0
        for o, t in zip(ours, theirs):
            lls = [float(x[0]) for x in t["filtered_resps"]]
            letters = list(o["scores"])
            worst = max(worst, max(abs(o["scores"][k] - ll) for k, ll in zip(letters, lls)))
            assert (o["pred"] == o["gold"]) == bool(t["acc"]) and (o["pred_norm"] == o["gold"]) == bool(t["acc_norm"])
            assert o["pred"] == [letters[max(range(len(lls)), key=lls.__getitem__)]]
        assert metrics[f"{task}/acc"] == pytest.approx(ref["results"][name]["acc,none"], abs=1e-12)
        assert metrics[f"{task}/acc_norm"] == pytest.approx(ref["results"][name]["acc_norm,none"], abs=1e-12)
    assert worst <= 1e-4


class CannedBackend:
    """An eval backend with the tiny tokenizer, a canned free answer and letter scores favouring B."""
    model = None

    def __init__(self, answer):
        from medpipe.stages.models.loader import load_tokenizer

        self.tok = load_tokenizer(tiny_artifact().tokenizer_path)
        self.answer, self.scored = answer, []

    has_template = True

    def render(self, messages):
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(self, prompts, max_new_tokens, add_special_tokens, num_beams=1):
        return [self.answer] * len(prompts)

    def next_token_scores(self, prompts, candidates, add_special_tokens):
        self.scored += prompts
        return [{t: 10.0 if self.tok.decode([t]).strip() == "B" else 0.0 for t in c} for c in candidates]


CMB = Path(__file__).parent / "fixtures" / "formats" / "CMB-Exam" / "CMB-val" / "CMB-val-merge.json"


def test_opencompass_cmb_prompt_and_multiple_select():
    """OpenCompass on CMB-Exam as published: configs/datasets/cmb/cmb_gen_dfb5c4.py (HUMAN
    "以下是中国{exam_type}中{exam_class}考试的一道{question_type}，不需要做任何分析和解释，直接输出答案选项。\n{question}\n
    {option_str} \n 答案: ", zero-shot, max_out_len=10) + datasets/cmb.py (option_str = "k. v" of the options
    longer than one character, joined by "\n"); multiple_select_postprocess then AccEvaluator (exact string)."""
    from medpipe.stages.evaluation.runner import eval_mcq
    from medpipe.stages.evaluation.sets import plan_sets

    [s] = plan_sets(EvalParams(data=str(CMB)))
    assert s.fmt == "cmb"
    assert oc.render(s.records[1], "cmb", [], None, chat=False) == (
        "以下是中国医师考试中规培结业考试的一道多项选择题，不需要做任何分析和解释，直接输出答案选项。\n下列属于2型糖尿病一线治疗的是\n"
        "A. 生活方式干预\nB. 二甲双胍\nC. 胰岛素泵\nD. 饮食控制 \n 答案: ")
    # "15" stays, the one-character option "5" is left out of the prompt (len(v) > 1), as datasets/cmb.py does
    assert oc.render(s.records[3], "cmb", [], None, chat=False).endswith("\nA. 15\nC. 30\nD. 40 \n 答案: ")
    b = CannedBackend("答案：A、B、D")
    res, details = eval_mcq(s, EvalParams(protocol="opencompass"), b, [], None)
    assert [d["extracted"] for d in details] == ["ABD"] * 4       # every uppercase letter, sorted set
    assert [d["correct"] for d in details] == [False, True, False, False] and res["metrics"]["acc"] == 0.25
    assert details[1]["pred"] == ["A", "B", "D"] and res["protocol"] == "opencompass"


def test_medcare_generate_then_cue_flow():
    """model_diverse_gen_batch.py: chat prompt (system + question + task line) → free answer → the
    answer, ". " (no final ".") and "\n答案为" appended inside the assistant turn → one letter."""
    from medpipe.stages.evaluation.protocols import generate_then_cue
    from medpipe.stages.evaluation.sets import EvalSet
    from medpipe.stages.evaluation.runner import eval_mcq

    b = CannedBackend("所以选B。")
    item = {**ZH, "answer": ["B"]}
    p = EvalParams(protocol="medcare", max_new_tokens=4)
    rows = generate_then_cue([item], p, b, [""], ["zh"])
    prompt = b.render([{"role": "system", "content": "You are a helpful assistant."},
                       {"role": "user", "content": medcare.user_turn(item, "zh")}])
    assert b.scored == [prompt + "所以选B。" + ". " + "\n答案为"]
    assert rows[0]["text"].startswith("所以选B。. \n答案为") and rows[0]["text"].strip().endswith("B")
    assert rows[0]["pred"] == ["B"] and rows[0]["correct"] is True
    res, details = eval_mcq(EvalSet("ceval", "mcq", "ceval", [item, {**item, "answer": ["A", "B"]}]), p, b, [], None)
    assert [d["correct"] for d in details] == [True, False] and res["metrics"]["acc"] == 0.5  # multi-answer: never


@pytest.mark.slow
def test_lm_eval_protocol_mmlu_few_shot_equals_lm_eval(tmp_path, monkeypatch):
    """mmlu_<subject> 2-shot: lm-eval's own subject yaml (description, template, first_n over the
    dev split) on the local CSVs vs protocol=lm-eval with fewshot_data = the dev folder (shots of the
    item's own subject, file order): the same contexts, so the same log-likelihoods."""
    pytest.importorskip("lm_eval", reason="lm-eval not installed (the Makefile installs lm-eval[hf]==0.4.13)")
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    from medpipe.stages.evaluation.protocols.lmeval_tasks import write_tasks

    tasks = {"mmlu_anatomy": "anatomy", "mmlu_clinical_knowledge": "clinical_knowledge"}
    names = write_tasks(tmp_path / "tasks", {t: f"{MMLU}/test/{s}_test.csv" for t, s in tasks.items()},
                        train={t: f"{MMLU}/dev/{s}_dev.csv" for t, s in tasks.items()})
    ref = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tiny_artifact().model_path},dtype=float32",
                                  tasks=names, batch_size=8, device="cpu", log_samples=True, num_fewshot=2,
                                  task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    p = EvalParams(data=list(tasks), protocol="lm-eval", data_dir=MMLU, shots=2,
                   fewshot_data={"path": f"{MMLU}/dev", "format": "mmlu"})
    evaluate(p, tiny_artifact(), tmp_path / "mp", **QUIET)
    for task, name in zip(tasks, names):
        ours = [json.loads(x) for x in (tmp_path / "mp" / "details" / f"{task}.jsonl").read_text().splitlines()]
        theirs = sorted(ref["samples"][name], key=lambda r: r["doc_id"])
        assert len(ours) == len(theirs) > 0
        assert theirs[0]["arguments"][0][0].startswith("The following are multiple choice questions (with answers) "
                                                       f"about {tasks[task].replace('_', ' ')}.\n\n")
        for o, t in zip(ours, theirs):
            assert list(o["scores"].values()) == pytest.approx([float(x[0]) for x in t["filtered_resps"]], abs=1e-4)
            assert (o["pred"] == o["gold"]) == bool(t["acc"])


@pytest.mark.slow
def test_lm_eval_protocol_few_shot_draws_equal_lm_eval(tmp_path, monkeypatch):
    """2-shot MedQA: lm-eval draws the shots from its training split with Random(1234), doc after
    doc; protocol=lm-eval with fewshot_data = that file builds the same contexts (same scores);
    and with the chat template as `lm_eval --apply_chat_template` renders it."""
    pytest.importorskip("lm_eval", reason="lm-eval not installed (the Makefile installs lm-eval[hf]==0.4.13)")
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    from medpipe.stages.evaluation.protocols.lmeval_tasks import write_tasks

    medqa = f"{samples()}/mcq_medqa.jsonl"
    names = write_tasks(tmp_path / "tasks", {"medqa_4options": medqa}, train={"medqa_4options": medqa})
    ref = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tiny_artifact().model_path},dtype=float32",
                                  tasks=names, batch_size=8, device="cpu", log_samples=True, num_fewshot=2, limit=12,
                                  task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    p = EvalParams(data={"path": medqa, "format": "medqa", "limit": 12}, protocol="lm-eval", shots=2,
                   fewshot_data={"path": medqa, "format": "medqa"})
    evaluate(p, tiny_artifact(), tmp_path / "mp", **QUIET)
    ours = [json.loads(x) for x in (tmp_path / "mp" / "details" / "medqa.jsonl").read_text().splitlines()]
    theirs = sorted(ref["samples"][names[0]], key=lambda r: r["doc_id"])
    assert len(ours) == len(theirs) == 12
    for o, t in zip(ours, theirs):
        lls = [float(x[0]) for x in t["filtered_resps"]]
        assert list(o["scores"].values()) == pytest.approx(lls, abs=1e-4)
        assert (o["pred"] == o["gold"]) == bool(t["acc"])
    # --apply_chat_template (few-shot as multi-turn, continuation "A" without the space) = chat=true
    ref = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tiny_artifact().model_path},dtype=float32",
                                  tasks=names, batch_size=8, device="cpu", log_samples=True, num_fewshot=1, limit=6,
                                  apply_chat_template=True, task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    p = EvalParams(data={"path": medqa, "format": "medqa", "limit": 6}, protocol="lm-eval", shots=1, chat=True,
                   fewshot_data={"path": medqa, "format": "medqa"})
    evaluate(p, tiny_artifact(), tmp_path / "chat", **QUIET)
    ours = [json.loads(x) for x in (tmp_path / "chat" / "details" / "medqa.jsonl").read_text().splitlines()]
    theirs = sorted(ref["samples"][names[0]], key=lambda r: r["doc_id"])
    assert theirs[0]["arguments"][0][1] == "A"
    for o, t in zip(ours, theirs):
        assert list(o["scores"].values()) == pytest.approx([float(x[0]) for x in t["filtered_resps"]], abs=1e-4)
