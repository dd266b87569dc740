"""protocol `medcare` (and method `generate_then_cue`): the MedCare authors' exam evaluation.

Followed files (BlueZeros/MedCare @fcf9a3ff): medcare/eval/model_diverse_gen_batch.py (generation),
medcare/eval/eval_em.py (scoring), medcare/conversations.py (`conv_qwen`).
1. The chat (system "You are a helpful assistant.", user = question + option lines + the task
   line: English sets "…as: The answer is {answer}." — `{answer}` literally —, Chinese sets
   "…答案为{answer}。") through the model's chat template (a plain transcript without one).
2. A free greedy answer (≤ `max_new_tokens`, stops at <|im_end|>/eos).
3. The cue appended inside the assistant turn: prompt + output + (" " if it ends with "." else ". ")
   + "\nThe answer is " / "\n答案为" (the cue the prompt contains).
4. One forced token: the authors add +100 to the letters' logits (A–D, A–E when the prompt shows
   "E." or "(E)") and decode one greedy token; here the highest-scoring letter token (" X" or "X",
   `letter_token_ids`) — the same token unless a non-letter beats a letter by 100 logits.
5. text = output + sep + cue + letter, scored by `multiplechoice_acc` (Chinese) /
   `multiplechoice_en_acc` (English) as eval_em.py writes them (`medcare_zh_correct`,
   `medcare_en_correct`). A multi-answer item can only be right if the one forced letter is the
   whole answer — i.e. never, as in the authors' numbers.
Deviations: medpipe's generate strips the free answer before the cue is appended; the letter's
token forms are medpipe's (" X" and "X").
"""
from __future__ import annotations

import re
from typing import Any

SYSTEM = "You are a helpful assistant."
TASK_EN = "\n\nPlease format the final answer at the end of the response as: The answer is {answer}."
TASK_ZH = "\n\n请在回答的最后用以下格式回答：答案为{answer}。"
CUE_EN = "\nThe answer is "
CUE_ZH = "\n答案为"
_ZH_RE = re.compile(r"答案为(.*?)$")
_EN_RE = re.compile(r"The answer is (.*?)$")


def user_turn(item: dict, lang: str) -> str:
    """The question with its option lines, then the language's task line ({answer} is literal)."""
    opts = "\n".join(f"{k}. {v}" for k, v in item["options"].items())
    ctx = f"{item['context']}\n" if item.get("context") else ""
    return f"{ctx}{item.get('question') or ''}\n{opts}" + (TASK_ZH if lang == "zh" else TASK_EN)


def cue_of(prompt: str) -> str:
    """model_diverse_gen_batch.py: "The answer is" checked first, then "答案为"."""
    return CUE_EN if "The answer is" in prompt else CUE_ZH


def sep_of(output: str) -> str:
    return " " if output.strip().endswith(".") else ". "


def medcare_zh_correct(text: str, gold: str) -> bool:
    """eval_em.py `multiplechoice_acc`: the last "答案为…" line (after cutting at the last
    "\\n\\n\\n") must hold every gold letter and no other of A–E; judgement-style fallback."""
    t = text.rsplit("\n\n\n", 1)[0]
    m = _ZH_RE.search(t)
    others = [o for o in "ABCDE" if o not in gold]
    if m is None:
        if "错，为本题正确答案" in text and f"{gold}错，为本题正确答案" in text:
            return True
        if any(f"{g}对" not in text for g in gold):
            return False
        return not any(f"{o}对" in text for o in others)
    pred = m[0]
    return all(g in pred for g in gold) and not any(o in pred for o in others)


def medcare_en_correct(text: str, gold: str) -> bool:
    """eval_em.py `multiplechoice_en_acc`: every gold letter on the "The answer is …" line; other
    letters matter only for multi-answer items."""
    m = _EN_RE.search(text)
    if m is None:
        return False
    pred = m[0]
    if not all(g in pred for g in gold):
        return False
    return len(gold) == 1 or not any(o in pred for o in "ABCDE" if o not in gold)


def run(items: list[dict], p: Any, backend: Any, langs: list[str], rag_ctx: list[str]) -> list[dict]:
    """Steps 1–5 for every item (batched: one generate call, one next-token call)."""
    from ..prompts import prompt_hash
    from ..scoring import letter_token_ids

    tok = backend.tok
    prompts = []
    for it, lg, rc in zip(items, langs, rag_ctx):
        body = user_turn({**it, "context": "\n".join(x for x in (rc, it.get("context")) if x)}, lg)
        prompts.append(backend.render([{"role": "system", "content": SYSTEM}, {"role": "user", "content": body}]))
    special = not backend.has_template
    outputs = backend.generate(prompts, p.max_new_tokens, special)
    seconds = [pr + o + sep_of(o) + cue_of(pr) for pr, o in zip(prompts, outputs)]
    letter_sets = ["ABCDE" if ("E." in pr or "(E)" in pr) else "ABCD" for pr in prompts]
    cand = letter_token_ids(tok, sorted(set("".join(letter_sets))))
    per_prompt = [[t for x in ls for t in cand[x]] for ls in letter_sets]
    scores = backend.next_token_scores(seconds, per_prompt, special)
    out = []
    for it, lg, pr, o, sc, ls in zip(items, langs, prompts, outputs, scores, letter_sets):
        best = max(sc, key=sc.get)
        letter = tok.decode([best])
        text = o + sep_of(o) + cue_of(pr) + letter
        gold = "".join(it["answer"])
        correct = medcare_en_correct(text, gold) if lg == "en" else medcare_zh_correct(text, gold)
        shown = letter.strip()
        out.append({"id": it.get("id"), "gold": it["answer"], "pred": [shown] if shown in it["options"] else None,
                    "correct": correct, "text": text, "scores": {x: max(sc[t] for t in cand[x]) for x in ls},
                    "n_tokens": {x: 1 for x in ls}, "chars": {x: 1 for x in ls},
                    "prompt_sha": prompt_hash(pr)})
    return out
