"""medpipe's own ("native") multiple-choice prompts and their language, in one place: the eval
stage (cue / ppl / generate / VoC), C-Poly's ppl training format and voc_label all build their
prompts here. Harness protocols (lm-eval, OpenCompass, MedCare, CMExam) are in the protocols package.

Items are normalised mcq records (docs/CONTRACTS.md):
``{"id", "question", "context", "options": {"A": ...}, "answer": [letters], "explanation", ...}``.

Language: ``lang="auto"`` picks per item from its question with the one detector
(``medpipe.data.lang.detect_lang``, also used by the SFT renderer); "en" / "zh" force it.
``chat=True`` renders prompts through the tokenizer's chat template (the instruction as the user
turn, the answer prefix as the start of the assistant turn); default plain text.

Templates are module-level constants (``str.format`` fields in braces); each prompt is
``BODY`` (user text) + ``PREFIX`` (start of the answer).
"""
from __future__ import annotations

import re
from typing import Any, Sequence

from medpipe.data.lang import LANGS, detect_lang

__all__ = ["ANSWER_CUE_EN", "ANSWER_CUE_ZH", "LANGS", "PQA_OPTIONS", "TEMPLATES", "build_ppl_prompt",
           "cue_prompt", "detect_lang", "fields", "item_lang", "options_of", "pick_shots", "ppl_shots_block",
           "render_turns", "with_context"]

# Context line, present only when the item has a context.
CONTEXT_EN = "Context: {context}\n"
CONTEXT_ZH = "背景：{context}\n"
# One option line in a listing: "A. text".
OPTION_LINE_EN = "{letter}. {option}"
OPTION_LINE_ZH = "{letter}. {option}"

# Option perplexity: prompt = PPL_BODY + PPL_PREFIX; continuation = PPL_OPTION (scored tokens).
PPL_BODY_EN = "{context}Question: {question}\n"
PPL_PREFIX_EN = "Answer:"
PPL_OPTION_EN = " {option}"
PPL_BODY_ZH = "{context}问题：{question}\n"
PPL_PREFIX_ZH = "答案："
PPL_OPTION_ZH = "{option}"

# Answer-cue letter scoring: CUE_BODY + ANSWER_CUE, next-token logits of the letters.
CUE_BODY_EN = "{context}Question: {question}\nOptions:\n{options}\n"
ANSWER_CUE_EN = "The answer is"
CUE_BODY_ZH = "{context}问题：{question}\n选项：\n{options}\n"
ANSWER_CUE_ZH = "答案为"

# VoC step 1 (plan), one prompt per option letter.
VOC_PLAN_BODY_EN = ("{context}Question: {question}\nOptions:\n{options}\n"
                    "Think about why the answer is {letter} ({option}). Explain the reasoning.\n")
VOC_PLAN_PREFIX_EN = "Reasoning:"
VOC_PLAN_BODY_ZH = ("{context}问题：{question}\n选项：\n{options}\n"
                    "请思考为什么答案是{letter}（{option}），并说明理由。\n")
VOC_PLAN_PREFIX_ZH = "理由："
# VoC step 2 (execute / verify): all justifications, one line each.
VOC_EXPLANATION_EN = "Reasoning for {letter}: {explanation}"
VOC_VERIFY_BODY_EN = ("{context}Question: {question}\nOptions:\n{options}\n"
                      "Reasoning written for each option:\n{explanations}\n"
                      "Which reasoning is logically complete and consistent with the context? "
                      "Check each one.\n")
VOC_VERIFY_PREFIX_EN = "Verification:"
VOC_EXPLANATION_ZH = "选项{letter}的理由：{explanation}"
VOC_VERIFY_BODY_ZH = ("{context}问题：{question}\n选项：\n{options}\n"
                      "针对每个选项的理由：\n{explanations}\n"
                      "哪一个理由逻辑完整且与背景一致？请逐一检查。\n")
VOC_VERIFY_PREFIX_ZH = "检查："
# VoC step 3 (final response), asked after the verification text (a third turn in chat mode).
VOC_FINAL_BODY_EN = 'Give the final response in the form "Answer: X", where X is one of {letters}.\n'
VOC_FINAL_PREFIX_EN = ""
VOC_FINAL_BODY_ZH = "请以“Answer: X”的形式给出最终回答，X 为 {letters} 之一。\n"
VOC_FINAL_PREFIX_ZH = ""
# voc_label: the PQA-U long answer, appended to the context.
LONG_ANSWER_EN = "Long answer: {long_answer}"
LONG_ANSWER_ZH = "长答案：{long_answer}"

PQA_OPTIONS = {"A": "yes", "B": "no", "C": "maybe"}

TEMPLATES: dict[str, dict[str, str]] = {
    "en": dict(context=CONTEXT_EN, option_line=OPTION_LINE_EN, ppl_body=PPL_BODY_EN,
               ppl_prefix=PPL_PREFIX_EN, ppl_option=PPL_OPTION_EN, cue_body=CUE_BODY_EN,
               cue=ANSWER_CUE_EN, plan_body=VOC_PLAN_BODY_EN, plan_prefix=VOC_PLAN_PREFIX_EN,
               explanation=VOC_EXPLANATION_EN, verify_body=VOC_VERIFY_BODY_EN,
               verify_prefix=VOC_VERIFY_PREFIX_EN, final_body=VOC_FINAL_BODY_EN,
               final_prefix=VOC_FINAL_PREFIX_EN, long_answer=LONG_ANSWER_EN, letter_sep=", "),
    "zh": dict(context=CONTEXT_ZH, option_line=OPTION_LINE_ZH, ppl_body=PPL_BODY_ZH,
               ppl_prefix=PPL_PREFIX_ZH, ppl_option=PPL_OPTION_ZH, cue_body=CUE_BODY_ZH,
               cue=ANSWER_CUE_ZH, plan_body=VOC_PLAN_BODY_ZH, plan_prefix=VOC_PLAN_PREFIX_ZH,
               explanation=VOC_EXPLANATION_ZH, verify_body=VOC_VERIFY_BODY_ZH,
               verify_prefix=VOC_VERIFY_PREFIX_ZH, final_body=VOC_FINAL_BODY_ZH,
               final_prefix=VOC_FINAL_PREFIX_ZH, long_answer=LONG_ANSWER_ZH, letter_sep="、"),
}

_LETTER_RE = re.compile(r"^[A-Z]$")


def item_lang(item: dict, lang: str = "auto") -> str:
    """The template language of an item: detected from its question, or the forced `lang`."""
    if lang == "auto":
        return detect_lang(str(item.get("question") or ""))
    if lang not in TEMPLATES:
        raise ValueError(f"lang must be 'auto', 'en' or 'zh', got {lang!r}")
    return lang


def options_of(item: dict) -> dict[str, str]:
    opts = item.get("options") or {}
    if not opts:
        raise ValueError(f"item {item.get('id')!r} has no options")
    for k in opts:
        if not _LETTER_RE.match(str(k)):
            raise ValueError(f"item {item.get('id')!r}: option key {k!r} is not a letter A-Z")
    return {str(k): str(v) for k, v in opts.items()}


def fields(item: dict, lang: str) -> dict[str, str]:
    """The template fields of an item in language `lang` (context line, question, option lines, letters)."""
    t = TEMPLATES[lang]
    ctx = item.get("context")
    opts = options_of(item)
    return {
        "context": t["context"].format(context=ctx) if ctx else "",
        "question": str(item.get("question") or ""),
        "options": "\n".join(t["option_line"].format(letter=k, option=v) for k, v in opts.items()),
        "letters": t["letter_sep"].join(opts),
    }


def render_turns(tok: Any, turns: Sequence[tuple[str, str]], prefix: str, chat: bool) -> str:
    """Plain: the turns' texts concatenated + prefix. Chat: the tokenizer's chat template over the
    turns (roles user/assistant) with a generation prompt, then the prefix."""
    if not chat:
        return "".join(text for _, text in turns) + prefix
    if getattr(tok, "chat_template", None) is None:
        raise ValueError("chat=True but the tokenizer has no chat template")
    msgs = [{"role": role, "content": text.rstrip("\n")} for role, text in turns]
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + prefix


def build_ppl_prompt(item: dict, lang: str = "auto", *, tok: Any = None, chat: bool = False
                     ) -> tuple[str, dict[str, str]]:
    """(prompt, {letter: continuation}) for option-perplexity scoring."""
    lg = item_lang(item, lang)
    t = TEMPLATES[lg]
    prompt = render_turns(tok, [("user", t["ppl_body"].format(**fields(item, lg)))], t["ppl_prefix"], chat)
    opt_tpl = "{option}" if chat else t["ppl_option"]
    return prompt, {k: opt_tpl.format(option=v) for k, v in options_of(item).items()}


def ppl_shots_block(shots: Sequence[dict], lang: str) -> str:
    """k solved examples for option perplexity: question, answer prefix and the gold option's text."""
    t = TEMPLATES[lang]
    return "\n".join(t["ppl_body"].format(context="", question=e["question"]) + t["ppl_prefix"]
                     + t["ppl_option"].format(option=e["options"][e["answer"][0]]) for e in shots)


def cue_prompt(item: dict, lang: str = "auto", shots: Sequence[dict] = (), tok: Any = None,
               chat: bool = False) -> str:
    """Answer-cue prompt (MedCare-style): k solved examples, then the item's question and options,
    ending with the cue "The answer is" / "答案为" (chat: the examples as user/assistant turns and
    the cue opening the assistant turn)."""
    lg = item_lang(item, lang)
    t = TEMPLATES[lg]
    sep = " " if lg == "en" else ""
    if chat:
        turns: list[tuple[str, str]] = []
        for ex in shots:
            turns += [("user", t["cue_body"].format(**fields(ex, lg))), ("assistant", f"{t['cue']}{sep}{''.join(ex['answer'])}")]
        return render_turns(tok, turns + [("user", t["cue_body"].format(**fields(item, lg)))], t["cue"], True)
    solved = "".join(t["cue_body"].format(**fields(ex, lg)) + t["cue"] + sep + "".join(ex["answer"]) + "\n\n" for ex in shots)
    return solved + t["cue_body"].format(**fields(item, lg)) + t["cue"]


def pick_shots(item: dict, pool: list[dict], k: int) -> list[dict]:
    """k examples: same subject first, then same task, then any; file order; never the item itself."""
    if k <= 0 or not pool:
        return []
    key = (item.get("question"), tuple(sorted(item.get("options", {}).items())))
    pool = [e for e in pool if e.get("answer") and (e.get("question"), tuple(sorted(e["options"].items()))) != key]
    same_subj = [e for e in pool if item.get("subject") and e.get("subject") == item.get("subject")]
    same_task = [e for e in pool if e.get("task") == item.get("task") and e not in same_subj]
    rest = [e for e in pool if e not in same_subj and e not in same_task]
    return (same_subj + same_task + rest)[:k]


def with_context(item: dict, extra: str) -> dict:
    """The item with `extra` (k-shot block, RAG passages) in front of its context."""
    if not extra:
        return item
    ctx = item.get("context")
    return {**item, "context": f"{extra}\n{ctx}" if ctx else extra}


def prompt_hash(prompt: str) -> str:
    """What per-item details record of a prompt: sha256 of its text, 16 hex digits."""
    import hashlib

    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]
