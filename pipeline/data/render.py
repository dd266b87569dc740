"""Conversions between record kinds: mcq → chat / text, Huatuo QA → chat / text.

Templates follow the question's language (medpipe.data.lang.detect_lang, the one detector eval uses too).

mcq → chat:  user   "<instruction>\n\n[<context>\n\n]<question>\nA. ...\nB. ..."
             assistant "答案：A. <option text>\n解析：<explanation>"  /
                       "Answer: A. <option text>\nExplanation: <explanation>"
mcq → text:  the same prompt and answer as one "knowledge point" paragraph.
qa  → chat:  user question / assistant answer;  qa → text: "问：...\n答：..." / "Q: ...\nA: ..."
"""
from __future__ import annotations

from .lang import detect_lang

ZH = {"instr": "以下是一道医学考试选择题，请给出正确答案。", "ctx": "背景：", "ans": "答案：",
      "expl": "解析：", "q": "问：", "a": "答：", "sep": "；"}
EN = {"instr": "Answer the following medical multiple-choice question.", "ctx": "Context: ",
      "ans": "Answer: ", "expl": "Explanation: ", "q": "Q: ", "a": "A: ", "sep": "; "}


def lang_of(text: str) -> dict:
    return ZH if detect_lang(text) == "zh" else EN


def mcq_prompt(rec: dict, with_instruction: bool = True) -> str:
    L = lang_of(rec["question"])
    parts = []
    if with_instruction:
        parts.append(L["instr"])
    if rec.get("context"):
        parts.append(L["ctx"] + rec["context"])
    opts = "\n".join(f"{k}. {v}" for k, v in rec["options"].items())
    parts.append(f"{rec['question']}\n{opts}")
    return "\n\n".join(parts)


def mcq_answer(rec: dict) -> str:
    L = lang_of(rec["question"])
    letters = rec["answer"]
    texts = L["sep"].join(rec["options"][x] for x in letters)
    out = f"{L['ans']}{''.join(letters)}. {texts}"
    if rec.get("explanation"):
        out += f"\n{L['expl']}{rec['explanation']}"
    return out


def mcq_to_chat(rec: dict) -> dict:
    return {"messages": [{"role": "user", "content": mcq_prompt(rec)},
                         {"role": "assistant", "content": mcq_answer(rec)}],
            "task": rec.get("task")}


def mcq_to_text(rec: dict) -> dict:
    return {"text": mcq_prompt(rec, with_instruction=False) + "\n" + mcq_answer(rec)}


def qa_to_chat(rec: dict, task: str | None = None) -> dict:
    return {"messages": [{"role": "user", "content": rec["question"]},
                         {"role": "assistant", "content": rec["answer"]}], "task": task}


def qa_to_text(rec: dict) -> dict:
    L = lang_of(rec["question"])
    return {"text": f"{L['q']}{rec['question']}\n{L['a']}{rec['answer']}"}


def chat_to_text(rec: dict) -> str:
    """Plain rendering used for token-length statistics when no chat template exists."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in rec["messages"])
