"""protocol `cmexam`: CMExam's own evaluation (williamliujl/CMExam @fadb22c8).

Followed files: src/preprocess/prompt_templates.py (prompt 1: "问题: {Question}, \\n 选项: {Options}",
Options = "A <text>\\nB <text>…" — letter, space, text), src/LoRA/infer.py + templates/med_template.json
(input "{instruction}\\n### 回答:\\n", 4-beam search, 32 new tokens), and the canonical scorer
src/evaluation/evaluate_lora_result.py `parse_options` / `evaluate_prediction`:
* the answer text is the first line when the output mentions "解释" (else all of it);
* an option is predicted when its letter, or the FIRST whitespace-separated word of its text,
  occurs anywhere in that text (plain substring tests — "B. CT检查" predicts B and C);
* the predicted letters, in option order, must equal the gold letters exactly; nothing predicted
  is "无答案" and counts as wrong (in the denominator), reported as `invalid`.
`chat: true` wraps the instruction in the model's chat template instead of the LoRA template (a
deviation from the authors' inference, recorded in the result as `template: chat`).
"""
from __future__ import annotations

from typing import Any

PROMPT = "问题: {question}, \n 选项: {options}"
LORA_TEMPLATE = "{instruction}\n### 回答:\n"
NUM_BEAMS = 4
MAX_NEW_TOKENS = 32
NO_ANSWER = "无答案"


def options_field(item: dict) -> str:
    return "\n".join(f"{k} {v}" for k, v in item["options"].items())


def prompt_of(item: dict) -> str:
    return PROMPT.format(question=item.get("question") or "", options=options_field(item)).strip()


def parse_options(result: str | None, options: str) -> str:
    """evaluate_lora_result.py `parse_options`: the predicted letters, or 无答案."""
    if not isinstance(result, str) or not result:
        return NO_ANSWER
    r = result if "解释" not in result else result.split("\n")[0].strip()
    found = {}
    for op in options.split("\n"):
        words = op.split()
        if len(words) >= 2:
            found[words[0]] = words[1]
    pred = [k for k, text in found.items() if k in r or text in r]
    return "".join(pred) if pred else NO_ANSWER


def run(items: list[dict], p: Any, backend: Any, rag_ctx: list[str]) -> list[dict]:
    from ..prompts import prompt_hash

    prompts = []
    for it, rc in zip(items, rag_ctx):
        instruction = prompt_of({**it, "question": (rc + "\n" if rc else "") + str(it.get("question") or "")})
        prompts.append(backend.render([{"role": "user", "content": instruction}]) if p.chat
                       else LORA_TEMPLATE.format(instruction=instruction))
    texts = backend.generate(prompts, MAX_NEW_TOKENS, not p.chat, num_beams=NUM_BEAMS)
    out = []
    for it, pr, text in zip(items, prompts, texts):
        got = parse_options(text, options_field(it))
        pred = list(got) if got != NO_ANSWER else None
        out.append({"id": it.get("id"), "gold": it["answer"], "pred": pred, "text": text,
                    "correct": got == "".join(sorted(it["answer"])), "invalid": NO_ANSWER if pred is None else None,
                    "prompt_sha": prompt_hash(pr)})
    return out
