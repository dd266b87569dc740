"""One language detector (medpipe.data.lang.detect_lang) for every prompt: SFT rendering, eval and
C-Poly prompts, RAG passage headers. The rule: Chinese when CJK ideographs are >= 1/5 of the
Latin letters."""
from __future__ import annotations

from medpipe.data.lang import detect_lang
from medpipe.data.render import mcq_prompt, mcq_answer
from medpipe.stages.evaluation.prompts import build_ppl_prompt, cue_prompt

GLOSSED = {"id": "g", "question": "Which drug treats hypertension (高血压) first-line?",
           "options": {"A": "Amlodipine", "B": "Insulin"}, "answer": ["A"]}


def test_the_rule_on_mixed_text():
    assert detect_lang(GLOSSED["question"]) == "en"      # 3 CJK vs 36 Latin letters
    assert detect_lang("高血压患者首选哪种ACEI类药物？") == "zh"  # 8 CJK vs 4 Latin letters
    assert detect_lang("高血压ABCDEFGHIJKLMNO") == "zh"      # exactly 1/5: Chinese
    assert detect_lang("高血压ABCDEFGHIJKLMNOP") == "en"     # just under 1/5
    assert detect_lang("") == "en" and detect_lang(None) == "en" and detect_lang("かな only") == "en"


def test_an_english_question_with_a_chinese_gloss_is_english_everywhere():
    # SFT / CPT rendering (data layer)
    assert mcq_prompt(GLOSSED).startswith("Answer the following medical multiple-choice question.")
    assert mcq_answer(GLOSSED) == "Answer: A. Amlodipine"
    # eval's cue prompt and the ppl prompt C-Poly trains on
    assert cue_prompt(GLOSSED).endswith("B. Insulin\nThe answer is")
    prompt, conts = build_ppl_prompt(GLOSSED)
    assert prompt == "Question: Which drug treats hypertension (高血压) first-line?\nAnswer:"
    assert conts == {"A": " Amlodipine", "B": " Insulin"}
    # a Chinese question is Chinese in all of them
    zh = {**GLOSSED, "question": "高血压患者首选哪种药物？"}
    assert mcq_prompt(zh).startswith("以下是一道医学考试选择题") and cue_prompt(zh).endswith("答案为")
    assert build_ppl_prompt(zh)[0].endswith("答案：")


def test_chat_rag_passages_follow_the_same_rule():
    from medpipe.commands.chat import augment

    class Retriever:
        k = 1

        def search(self, queries, k):
            return [[{"text": "Amlodipine lowers blood pressure."}] for _ in queries]

    assert augment(GLOSSED["question"], Retriever()).startswith("Reference passages:\n[1] Amlodipine")
    assert augment("高血压患者首选哪种药物？", Retriever()).startswith("参考资料：\n[1] Amlodipine")
