"""Verification-of-Choice (AntGLM-Med): answer a multiple-choice item by reasoning about every
option, and pseudo-label unlabeled items with it (the voc_label stage).

``voc_answer``: (1) plan: for every option X a prompt "think about why the answer is X" -> a
justification; (2) execute: all justifications with the question and context -> which reasoning is
logically complete and consistent (verification text); (3) final response ``Answer: X`` parsed
with ``parse_final_answer`` (strict regex, letter must be one of the item's options, conflicting
letters rejected). Unparseable -> answer None, reason "unparseable": never guessed. Every step is
one batched greedy generate over all prompts (the one generate loop,
medpipe.stages.inference.runtime.LocalModel.generate_ids; left padding). ``voc_label``
pseudo-labels unlabeled items (PubMedQA PQA-U: the long answer is appended to the context;
options yes/no/maybe) and returns normalised mcq records carrying the VoC trace. Prompts:
prompts.py (VOC_* templates).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

from .prompts import PQA_OPTIONS, TEMPLATES, fields as _fields, item_lang as _lang, options_of as _options
from .prompts import render_turns as _render
from .scoring import _item_id, _tasks_for

__all__ = ["FINAL_ANSWER_RE", "generate_texts", "parse_final_answer", "voc_answer", "voc_label"]

# "Answer: X" / "答案：X" with optional brackets, or the sentence "The answer is X" / "答案是X" /
# "答案为X" (what instruct models write instead: SmolLM2-135M gave "The answer is A (yes)" on 8 of 8
# PubMedQA items); the letter must not run into a word, so "the answer is Absolutely" is no answer.
FINAL_ANSWER_RE = re.compile(r"(?:(?:\b[Aa]nswer|ANSWER|答案)\s*[:：]|\b[Tt]he (?:correct |final )?answer is|答案[是为])"
                             r"\s*[(（\[]?\s*([A-Z])(?![A-Za-z])")


def generate_texts(model: Any, tok: Any, prompts: Sequence[str], *, max_new_tokens: int = 128,
                   batch_size: int = 8, tasks: Sequence[Any] | None = None,
                   add_special_tokens: bool = True, max_length: int | None = None) -> list[str]:
    """Greedy continuations of ``prompts`` through the one generate loop (batched, left padding,
    sorted by length; stops at eos / end-of-turn tokens; decoded, stripped). A module-level seam:
    tests stand in for the model here."""
    from medpipe.stages.inference.runtime import LocalModel

    return [c.text for c in LocalModel.wrap(model, tok).generate(
        list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size, max_length=max_length,
        add_special_tokens=add_special_tokens, tasks=tasks)]


def parse_final_answer(text: str | None, valid_letters: Sequence[str]) -> tuple[str | None, str | None]:
    """Strict parse of 'Answer: X' (also 'answer：(X)', '答案：X', 'The answer is X', '答案为X').
    Returns (letter, None) or
    (None, detail) with detail 'no_answer' | 'invalid_letter' | 'conflicting'."""
    found = FINAL_ANSWER_RE.findall(text or "")
    if not found:
        return None, "no_answer"
    letters = set(found)
    if len(letters) > 1:
        return None, "conflicting"
    letter = found[0]
    if letter not in set(valid_letters):
        return None, "invalid_letter"
    return letter, None


GenerateFn = Callable[[list[str], int, "list[Any] | None"], list[str]]


def voc_answer(items: Sequence[dict], model: Any = None, tok: Any = None, *, lang: str = "auto",
               chat: bool = False, max_new_tokens: int = 128, final_max_new_tokens: int = 16,
               batch_size: int = 8, task_ids: Any = None, max_length: int | None = None,
               generate_fn: GenerateFn | None = None) -> list[dict]:
    """Verification-of-Choice. Per item: ``{"id", "lang", "explanations": {letter: text},
    "verification": text, "final_text": raw, "answer": letter | None,
    "reason": None | "unparseable", "parse_detail": None | str, "pred": answer}``.

    ``generate_fn(prompts, max_new_tokens, tasks) -> texts`` replaces ``generate_texts`` (tests,
    other backends); otherwise ``model`` and ``tok`` are required."""
    if generate_fn is None:
        if model is None or tok is None:
            raise ValueError("voc_answer needs model and tok (or generate_fn)")

        def generate_fn(prompts, n_new, tasks):  # noqa: F811 - default backend
            return generate_texts(model, tok, prompts, max_new_tokens=n_new, batch_size=batch_size,
                                  tasks=tasks, add_special_tokens=not chat, max_length=max_length)
    tasks = _tasks_for(items, model, task_ids)
    langs = [_lang(it, lang) for it in items]
    flds = [_fields(it, lg) for it, lg in zip(items, langs)]
    opts = [_options(it) for it in items]

    # (1) plan: one prompt per (item, option)
    plan_prompts, plan_keys, plan_tasks = [], [], []
    for i, (it, lg, f) in enumerate(zip(items, langs, flds)):
        t = TEMPLATES[lg]
        for letter, text in opts[i].items():
            body = t["plan_body"].format(**f, letter=letter, option=text)
            plan_prompts.append(_render(tok, [("user", body)], t["plan_prefix"], chat))
            plan_keys.append((i, letter))
            plan_tasks.append(tasks[i] if tasks else None)
    plan_out = generate_fn(plan_prompts, max_new_tokens, plan_tasks if tasks else None)
    explanations: list[dict[str, str]] = [{} for _ in items]
    for (i, letter), text in zip(plan_keys, plan_out):
        explanations[i][letter] = text

    # (2) execute / verify
    verify_turns = []
    for i, (lg, f) in enumerate(zip(langs, flds)):
        t = TEMPLATES[lg]
        lines = "\n".join(t["explanation"].format(letter=k, explanation=v)
                          for k, v in explanations[i].items())
        verify_turns.append(t["verify_body"].format(**f, explanations=lines))
    verify_prompts = [_render(tok, [("user", vt)], TEMPLATES[lg]["verify_prefix"], chat)
                      for vt, lg in zip(verify_turns, langs)]
    verifications = generate_fn(verify_prompts, max_new_tokens, tasks)

    # (3) final response "Answer: X"
    final_prompts = []
    for vt, ver, lg, f in zip(verify_turns, verifications, langs, flds):
        t = TEMPLATES[lg]
        turns = [("user", vt), ("assistant", f"{t['verify_prefix']} {ver}\n"),
                 ("user", t["final_body"].format(letters=f["letters"]))]
        final_prompts.append(_render(tok, turns, t["final_prefix"], chat))
    finals = generate_fn(final_prompts, final_max_new_tokens, tasks)

    out = []
    for i, item in enumerate(items):
        letter, detail = parse_final_answer(finals[i], list(opts[i]))
        out.append({
            "id": _item_id(item, i), "lang": langs[i], "explanations": explanations[i],
            "verification": verifications[i], "final_text": finals[i], "answer": letter,
            "pred": letter, "reason": None if letter else "unparseable", "parse_detail": detail,
        })
    return out


def voc_label(items: Sequence[dict], model: Any = None, tok: Any = None, *,
              keep_unlabeled: bool = False, options: dict[str, str] | None = None,
              **voc_kwargs: Any) -> list[dict]:
    """Pseudo-label unlabeled items with VoC (PubMedQA PQA-U). The long answer (``long_answer``
    key, else ``explanation``) is appended to the context (LONG_ANSWER_*); items without options
    get ``options`` (default yes/no/maybe). Returns normalised mcq records (original fields kept,
    the original context, ``explanation`` = the long answer) with ``answer`` = [VoC letter],
    ``label_source`` = "voc" and the trace under ``voc``. Unparseable items are dropped, or kept
    with ``answer`` = [] when ``keep_unlabeled``."""
    options = dict(options or PQA_OPTIONS)
    lang = voc_kwargs.get("lang", "auto")
    aug = []
    for i, it in enumerate(items):
        long_answer = it.get("long_answer") or it.get("explanation")
        if not long_answer:
            loc = it.get("_loc", f"[{i}]")
            raise ValueError(f"{loc}: item {_item_id(it, i)!r} has no long answer to label from")
        lg = _lang(it, lang)
        la = TEMPLATES[lg]["long_answer"].format(long_answer=long_answer)
        ctx = it.get("context")
        a = dict(it)
        a["options"] = dict(it.get("options") or options)
        a["context"] = f"{ctx}\n{la}" if ctx else la
        aug.append(a)
    traces = voc_answer(aug, model, tok, **voc_kwargs)
    out = []
    for it, a, tr in zip(items, aug, traces):
        if tr["answer"] is None and not keep_unlabeled:
            continue
        rec = {
            "id": tr["id"], "question": it.get("question"), "context": it.get("context"),
            "options": a["options"], "answer": [tr["answer"]] if tr["answer"] else [],
            "explanation": it.get("long_answer") or it.get("explanation"),
            "subject": it.get("subject"), "task": it.get("task"),
        }
        for k, v in it.items():  # keep the reader's other fields (_loc, ...)
            rec.setdefault(k, v)
        rec.pop("long_answer", None)
        rec["label_source"] = "voc"
        rec["voc"] = tr
        out.append(rec)
    return out
