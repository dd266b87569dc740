"""protocol `opencompass`: OpenCompass generation configs — the prompt, greedy generation, then the
config's answer extraction compared exactly with the gold letters (AccEvaluator).

Followed files (open-compass/opencompass @a5acc4bb; record config name + commit with a number):
* MedQA: configs/datasets/MedQA/MedQA_gen_3bf756.py (zero-shot "ANSWER: $LETTER" prompt),
  extraction `first_option_postprocess(options='ABCD')`;
* MedMCQA: configs/datasets/medmcqa/medmcqa_gen_60c8f5.py + datasets/medmcqa.py (system line merged
  into the user turn; `answer_cleansing` zero-shot: the first standalone A–D);
* C-Eval: configs/datasets/ceval/ceval_gen_5f30c7.py (the first k dev items as examples —
  FixKRetriever [0..4] — the header repeated in every example, "答案: "),
  extraction `first_capital_postprocess`;
* CMMLU (a C-Eval-shaped set whose task is cmmlu_<subject>): configs/datasets/cmmlu/cmmlu_gen_c13365.py
  (5-shot FixK over dev, "题目：", the answer turn "答案是: {answer}" — kept, empty, at the end of a
  base model's prompt), `first_capital_postprocess`; the alias cmmlu_gen.py points to a 0-shot CoT
  config since 61185963 (2025-03-25): name the config with a number;
* CMB: configs/datasets/cmb/cmb_gen_dfb5c4.py (zero-shot, max_out_len=10, `multiple_select_postprocess`:
  the sorted set of every uppercase character) + datasets/cmb.py (option_str: the options longer than
  one character, "k. v" joined by "\n"); AccEvaluator compares that string with the file's answer
  string ("ABD") exactly. Format cmb (CMB-Exam JSON) keeps exam_type/exam_class/question_type.
* post-processors: utils/text_postprocessors.py; prompt joining: models/base.py (base models: the
  non-empty turns joined by "\\n", `add_special_tokens=True`) and models/huggingface_above_v4_33.py
  (chat models: the turns through the chat template, SYSTEM merged into the user turn).
`chat: false` renders as OpenCompass does for a base model, `chat: true` as for a chat model.
"""
from __future__ import annotations

import re
from typing import Any

# first_option_postprocess's patterns in order, `{o}` = the option letters (text_postprocessors.py).
# Two adjacent literals in the source have no comma between them: they are ONE pattern (#14) here too.
FIRST_OPTION_PATTERNS = [
    r"答案是?\s*([{o}])", r"答案是?\s*：\s*([{o}])", r"答案是?\s*:\s*([{o}])", r"答案选项应?该?是\s*([{o}])",
    r"答案选项应?该?为\s*([{o}])", r"答案应该?是\s*([{o}])", r"答案应该?选\s*([{o}])", r"答案选项为?\s*：\s*([{o}])",
    r"答案选项为?\s+\(?\*?\*?([{o}])\*?\*?\)?", r"答案选项是?\s*:\s*([{o}])", r"答案为\s*([{o}])", r"答案选\s*([{o}])",
    r"选择?\s*([{o}])", r"故选?\s*([{o}])只有选?项?\s?([{o}])\s?是?对", r"只有选?项?\s?([{o}])\s?是?错",
    r"只有选?项?\s?([{o}])\s?不?正确", r"只有选?项?\s?([{o}])\s?错误", r"说法不?对选?项?的?是\s?([{o}])",
    r"说法不?正确选?项?的?是\s?([{o}])", r"说法错误选?项?的?是\s?([{o}])", r"([{o}])\s?是正确的",
    r"([{o}])\s?是正确答案", r"选项\s?([{o}])\s?正确", r"所以答\s?([{o}])", r"所以\s?([{o}][.。$]?$)",
    r"所有\s?([{o}][.。$]?$)", r"[\s，：:,]([{o}])[。，,\.]?$", r"[\s，,：:][故即]([{o}])[。\.]?$",
    r"[\s，,：:]因此([{o}])[。\.]?$", r"[是为。]\s?([{o}])[。\.]?$", r"因此\s?([{o}])[。\.]?$", r"显然\s?([{o}])[。\.]?$",
    r"答案是\s?(\S+)(?:。|$)", r"答案应该是\s?(\S+)(?:。|$)", r"答案为\s?(\S+)(?:。|$)", r"(?i)ANSWER\s*:\s*([{o}])",
    r"[Tt]he answer is:?\s+\(?([{o}])\)?", r"[Tt]he answer is:?\s+\(?\*?\*?([{o}])\*?\*?\)?",
    r"[Tt]he answer is option:?\s+\(?([{o}])\)?", r"[Tt]he correct answer is:?\s+\(?([{o}])\)?",
    r"[Tt]he correct answer is option:?\s+\(?([{o}])\)?", r"[Tt]he correct answer is:?.*?boxed{{([{o}])}}",
    r"[Tt]he correct option is:?.*?boxed{{([{o}])}}", r"[Tt]he correct answer option is:?.*?boxed{{([{o}])}}",
    r"[Tt]he answer to the question is:?\s+\(?([{o}])\)?", r"^选项\s?([{o}])", r"^([{o}])\s?选?项",
    r"(\s|^)[{o}][\s。，,：:\.$]", r"1.\s?(.*?)$", r"1.\s?([{o}])[.。$]?$",
]
CUSHION_PATTERNS = [r"([{o}]):", r"([{o}])"]

MEDQA_PROMPT = ("Answer the following multiple choice question. The last line of your response should be of the "
                "following format: 'ANSWER: $LETTER' (without quotes) where LETTER is one of Options(e.g. one of "
                "ABCDEFGHIJKLMNOP). Think step by step before answering.\n\nQuestion:\n\n{question}\n\nOptions:\n\n"
                "{choices}")
MEDMCQA_SYSTEM = "You are a helpful medical assistant.\n\n"
MEDMCQA_PROMPT = ("Q: {question}\n Please select the correct answer from the options above and output only the "
                  "corresponding letter (A, B, C, D, or E) without any explanation or additional text.\n")
CEVAL_PROMPT = "以下是中国关于{subject_zh}考试的单项选择题，请选出其中的正确答案。\n{question}\n{options}\n答案: "
CMMLU_PROMPT = "以下是关于{subject_zh}的单项选择题，请直接给出正确答案的选项。\n题目：{question}\n{options}"
CMMLU_ANSWER = "答案是: {answer}"
CMB_PROMPT = ("以下是中国{exam_type}中{exam_class}考试的一道{question_type}，不需要做任何分析和解释，直接输出答案选项。\n"
              "{question}\n{option_str} \n 答案: ")
CEVAL_SUBJECTS_ZH = {"clinical_medicine": "临床医学", "basic_medicine": "基础医学", "physician": "医师资格",
                     "veterinary_medicine": "兽医学"}


def first_option(text: str, options: str, cushion: bool = True) -> str:
    """`first_option_postprocess`: for each pattern in order (on the stripped text, DOTALL), the
    first option letter (in `options` order) inside group 1 (or the whole match); '' if none."""
    text = text.strip()
    for pat in FIRST_OPTION_PATTERNS + (CUSHION_PATTERNS if cushion else []):
        m = re.search(pat.format(o=options), text, re.DOTALL)
        if m:
            out = m.group(1) if m.groups() and m.group(1) else m.group(0)
            for letter in options:
                if letter in out:
                    return letter
    return ""


def first_capital(text: str) -> str:
    """`first_capital_postprocess`: the first character with str.isupper()."""
    return next((t for t in text if t.isupper()), "")


def multiple_select(text: str) -> str:
    """`multiple_select_postprocess`: every uppercase character, as a sorted set."""
    return "".join(sorted({t for t in text if t.isupper()}))


def medmcqa_cleansing(prediction: str, n_options: int = 4) -> str:
    """datasets/medmcqa.py `answer_cleansing`, zero-shot, single-letter gold: the first standalone
    letter after removing the phrases the config removes; '' when there is none."""
    for phrase in ("I understand", "A through J", "A through E", "A through D"):
        prediction = prediction.replace(phrase, "")
    found = re.findall(r"\b(" + "|".join(chr(65 + i) for i in range(n_options)) + r")\b", prediction)
    return found[0].rstrip(".") if found else ""


def _subject_zh(item: dict) -> tuple[str, str]:
    """("ceval" | "cmmlu", the subject's Chinese name) — the same subjects and names as lm-eval's."""
    from .lmeval import CMMLU_SUBJECTS_ZH, exam_subject

    exam, subject = exam_subject(item)
    names = CMMLU_SUBJECTS_ZH if exam == "cmmlu" else CEVAL_SUBJECTS_ZH
    if subject not in names:
        raise ValueError(f"protocol opencompass: unknown medical subject {subject!r} of {exam} "
                         f"(one of {', '.join(names)})")
    return exam, names[subject]


def turns(item: dict, fmt: str, shots: list[dict]) -> list[tuple[str, str]]:
    """The config's (role, text) turns for one item, its own answer turn blanked (gen mode)."""
    opts = item["options"]
    if fmt == "medqa":
        choices = "".join(f"{k}. {v}\n" for k, v in opts.items())
        return [("user", MEDQA_PROMPT.format(question=item.get("question") or "", choices=choices))]
    if fmt == "medmcqa":
        q = f"{item.get('question') or ''}\n" + "\n".join(f"{k}. {v}" for k, v in opts.items())
        return [("user", MEDMCQA_SYSTEM + "\n" + MEDMCQA_PROMPT.format(question=q))]
    if fmt == "ceval":
        exam, subject_zh = _subject_zh(item)
        prompt, answer = (CMMLU_PROMPT, CMMLU_ANSWER) if exam == "cmmlu" else (CEVAL_PROMPT, "{answer}")

        def human(e: dict) -> str:
            return prompt.format(subject_zh=subject_zh, question=e.get("question") or "",
                                 options="\n".join(f"{k}. {v}" for k, v in e["options"].items()))
        out: list[tuple[str, str]] = []
        for e in shots:
            out += [("user", human(e)), ("assistant", answer.format(answer="".join(e["answer"])))]
        # the item's own answer turn with the answer blanked: C-Eval's is empty (skipped), CMMLU's
        # keeps its prefix (a base model reads it; a chat model's prompt stops before it)
        return out + [("user", human(item)), ("assistant", answer.format(answer=""))]
    if fmt == "cmb":
        option_str = "\n".join(f"{k}. {v}" for k, v in opts.items() if len(v) > 1)
        return [("user", CMB_PROMPT.format(exam_type=item.get("exam_type", ""), exam_class=item.get("exam_class", ""),
                                           question_type=item.get("question_type", ""),
                                           question=item.get("question") or "", option_str=option_str))]
    raise ValueError(f"protocol opencompass has no config for format '{fmt}' (medqa, medmcqa, ceval, cmb)")


def render(item: dict, fmt: str, shots: list[dict], backend: Any, chat: bool) -> str:
    ts = turns(item, fmt, shots)
    if chat:
        ts = ts[:-1] if ts[-1][0] == "assistant" else ts
        return backend.tok.apply_chat_template([{"role": r, "content": t} for r, t in ts], tokenize=False,
                                               add_generation_prompt=True)
    return "\n".join(t for _, t in ts if t)


def extract(text: str, fmt: str, item: dict) -> str:
    if fmt == "medqa":
        return first_option(text, "ABCD")
    if fmt == "medmcqa":
        return medmcqa_cleansing(text)
    if fmt == "ceval":
        return first_capital(text)
    return multiple_select(text)


def run(items: list[dict], fmt: str, p: Any, backend: Any, pool: list[dict], rag_ctx: list[str]) -> list[dict]:
    from ..prompts import prompt_hash

    from .lmeval import same_subject

    pool = [e for e in pool if e.get("answer")]
    # FixKRetriever [0..4]: the first k dev items of the subject's own dev split, the same for every item
    prompts = [render({**it, "question": (rc + "\n" if rc else "") + str(it.get("question") or "")}, fmt,
                      same_subject(it, pool)[: p.shots] if fmt == "ceval" else pool[: p.shots], backend, p.chat)
               for it, rc in zip(items, rag_ctx)]
    texts = backend.generate(prompts, 10 if fmt == "cmb" else p.max_new_tokens, not p.chat)
    out = []
    for it, pr, text in zip(items, prompts, texts):
        got = extract(text, fmt, it)
        out.append({"id": it.get("id"), "gold": it["answer"], "pred": sorted(got) if got else None, "text": text,
                    # AccEvaluator: the extracted string equals the file's answer string (letters in file order)
                    "extracted": got, "correct": got == "".join(it["answer"]),
                    "invalid": None if got else "no_answer", "prompt_sha": prompt_hash(pr)})
    return out
