"""The answer format RL prompts ask for and the parse every reward reads it with.

Prompt (`prompt_messages`): the exam item as the eval stage lists it (prompts.CUE_BODY: context,
question, options), then the answer-format instruction (INSTRUCTION_EN / _ZH); `shots` solved
examples go first as user/assistant turns whose answer is in the asked format. The grpo stage
hands these messages to TRL, which renders them through the model's chat template.

Parse (`parse_answer`): the letters inside the last `<answer>…</answer>`, else (unless
`require_tag`) anywhere in the text; the letters are read by the eval stage's own extractor
(`medpipe.stages.evaluation.metrics.extract_letters`: "The answer is X", "答案为X", "Answer: (X)",
or letters at the start), so a reward and the exam accuracy after RL read an answer the same way.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

from medpipe.stages.evaluation.metrics import extract_letters
from medpipe.stages.evaluation.prompts import TEMPLATES, fields, item_lang

INSTRUCTION_EN = ("Give the final answer as <answer>X</answer>, where X is the letter of the correct option "
                  "(all correct letters if several are correct).")
INSTRUCTION_ZH = "请以<answer>X</answer>的形式给出最终答案，X为正确选项的字母（多个正确选项时写出全部字母）。"
THINK_EN = "Think step by step inside <think>…</think> first. "
THINK_ZH = "请先在<think>…</think>中逐步思考。"

TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.S)
THINK_RE = re.compile(r"^\s*<think>.*?</think>\s*", re.S)


def instruction(lang: str, think: bool = False) -> str:
    if lang == "zh":
        return (THINK_ZH if think else "") + INSTRUCTION_ZH
    return (THINK_EN if think else "") + INSTRUCTION_EN


def user_text(item: dict, lang: str, think: bool = False) -> str:
    """The item's user turn: the eval stage's question + options listing, then the instruction."""
    return TEMPLATES[lang]["cue_body"].format(**fields(item, lang)) + instruction(lang, think)


def prompt_messages(item: dict, lang: str = "auto", shots: Sequence[dict] = (), think: bool = False) -> list[dict]:
    """Chat messages of an RL prompt (ending with the user turn): solved examples, then the item."""
    lg = item_lang(item, lang)
    msgs: list[dict] = []
    for ex in shots:
        msgs += [{"role": "user", "content": user_text(ex, lg, think)},
                 {"role": "assistant", "content": f"<answer>{''.join(ex['answer'])}</answer>"}]
    return msgs + [{"role": "user", "content": user_text(item, lg, think)}]


def completion_text(completion: Any) -> str:
    """TRL hands a completion as text, or (conversational prompts) as [{"role": "assistant", "content": ...}]."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(str(m.get("content") or "") for m in completion if isinstance(m, dict))
    return str(completion or "")


def tagged(text: str) -> str | None:
    """The inner text of the last `<answer>…</answer>`, or None."""
    found = TAG_RE.findall(text or "")
    return found[-1] if found else None


def parse_answer(text: str, valid: Sequence[str], require_tag: bool = False) -> tuple[list[str] | None, str | None]:
    """(sorted letters, None) or (None, reason): "no_tag" (require_tag and no tag), "no_answer",
    "unknown_letter" (a letter that is not an option)."""
    inner = tagged(text)
    if inner is None and require_tag:
        return None, "no_tag"
    return extract_letters(inner if inner is not None else text, valid)


def format_problem(text: str, valid: Sequence[str], think: bool = False) -> str | None:
    """Why a completion is not in the asked format, or None: exactly one `<answer>…</answer>`
    holding the letters of options, nothing but whitespace after it, and with `think` a
    `<think>…</think>` block first."""
    text = text or ""
    if text.count("<answer>") != 1 or text.count("</answer>") != 1:
        return "answer tags: want exactly one <answer>…</answer>"
    m = TAG_RE.search(text)
    if m is None:
        return "answer tags: </answer> before <answer>"
    if text[m.end():].strip():
        return "text after </answer>"
    if think and not THINK_RE.match(text[:m.start()]) :
        return "no <think>…</think> before the answer"
    letters, why = extract_letters(m.group(1), valid)
    return None if letters else f"answer: {why}"
