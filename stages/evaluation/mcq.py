"""Multiple-choice tools shared by the C-Poly task stage and the evaluation stage.

Items are normalised mcq records (docs/CONTRACTS.md):
``{"id", "question", "context", "options": {"A": ...}, "answer": [letters], "explanation", ...}``.

Three ways to get a model's choice:

* ``score_options_ppl`` - post-hoc option choice (AntGLM-Med): prompt = (context +) question, then
  each option's text as a continuation; the score of an option is the mean NLL of the option's
  tokens (``reduction="sum"``: summed NLL); the lowest score wins. Prompt and option are tokenised
  separately and concatenated (the separating space belongs to the option, as in lm-eval), so
  every option is scored after the same prompt tokens. Default (``share_prompt=True``): the
  prompts of a batch of items run once (left padding, explicit position ids, KV cache, logits of
  the last position only), the cache is gathered per option row and all options run as one
  right-padded batch on top of it - each prompt is computed once, not once per option.
  ``share_prompt=False`` (also the automatic fallback for a model without a reorderable cache):
  every (item, option) pair is one right-padded sequence, labels only on the option tokens, logits
  only from the first option position on (``logits_to_keep``). Items/sequences are sorted by
  length; no Python loop runs a forward per option.
* ``score_letters_cue`` - answer-cue letter scoring (MedCare): the prompt lists the options and
  ends with an answer cue (``ANSWER_CUE_EN`` "The answer is" / ``ANSWER_CUE_ZH`` "答案为"); the valid
  letter with the highest next-token logit wins. A letter's candidate tokens are the first token
  of ``" X"`` and of ``"X"`` (BPE tokenisers encode the two differently, SentencePiece ones may
  put "▁" first); a candidate is kept only if it decodes to exactly the letter (stripped) and is
  not a candidate of another letter; a letter's score is the max logit over its candidates.
  Batched with left padding, explicit position ids, ``logits_to_keep=1``.
* ``voc_answer`` - Verification-of-Choice (AntGLM-Med): (1) plan: for every option X a prompt
  "think about why the answer is X" -> a justification; (2) execute: all justifications with the
  question and context -> which reasoning is logically complete and consistent (verification
  text); (3) final response ``Answer: X`` parsed with ``parse_final_answer`` (strict regex, letter
  must be one of the item's options, conflicting letters rejected). Unparseable -> answer None,
  reason "unparseable": never guessed. Every step is one batched greedy ``model.generate`` over
  all prompts (left padding). ``voc_label`` pseudo-labels unlabeled items (PubMedQA PQA-U: the
  long answer is appended to the context; options yes/no/maybe) and returns normalised mcq
  records carrying the VoC trace.

Language: ``lang="auto"`` picks per item: "zh" when the question has CJK characters and they are
at least a fifth as many as its Latin letters, else "en"; or force "en" / "zh".
``chat=True`` renders prompts through the tokenizer's chat template (the instruction as the user
turn, the cue as the start of the assistant turn); default plain text.
Task ids (C-Poly): ``task_ids=None`` passes each item's ``task`` to models that accept task ids
(``model.accepts_task_ids``), nothing otherwise; ``True`` forces it, ``False`` never, a string
names one task for all items.

Templates are module-level constants (``str.format`` fields in braces); each prompt is
``BODY`` (user text) + ``PREFIX`` (start of the answer). Heavy imports (torch) happen inside
functions only.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any, Callable, Sequence

__all__ = [
    "ANSWER_CUE_EN", "ANSWER_CUE_ZH", "PQA_OPTIONS", "TEMPLATES",
    "accuracy", "build_cue_prompt", "build_ppl_prompt", "detect_lang", "generate_texts",
    "is_correct", "letter_token_ids", "parse_final_answer", "score_letters_cue",
    "score_options_ppl", "voc_answer", "voc_label",
]

# --- templates ---------------------------------------------------------------------------------
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

# "Answer: X" / "答案：X" with optional brackets; the letter must not run into a word.
FINAL_ANSWER_RE = re.compile(r"(?:\b[Aa]nswer|ANSWER|答案)\s*[:：]\s*[(（\[]?\s*([A-Z])(?![A-Za-z])")
_LETTER_RE = re.compile(r"^[A-Z]$")
_CJK_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN_RE = re.compile(r"[A-Za-z]")


# --- helpers -----------------------------------------------------------------------------------
def detect_lang(text: str) -> str:
    """'zh' if CJK characters are present and >= 1/5 of the Latin letters, else 'en'."""
    cjk = len(_CJK_RE.findall(text or ""))
    latin = len(_LATIN_RE.findall(text or ""))
    return "zh" if cjk > 0 and cjk * 5 >= latin else "en"


def _lang(item: dict, lang: str) -> str:
    if lang == "auto":
        return detect_lang(str(item.get("question") or ""))
    if lang not in TEMPLATES:
        raise ValueError(f"lang must be 'auto', 'en' or 'zh', got {lang!r}")
    return lang


def _options(item: dict) -> dict[str, str]:
    opts = item.get("options") or {}
    if not opts:
        raise ValueError(f"item {item.get('id')!r} has no options")
    for k in opts:
        if not _LETTER_RE.match(str(k)):
            raise ValueError(f"item {item.get('id')!r}: option key {k!r} is not a letter A-Z")
    return {str(k): str(v) for k, v in opts.items()}


def _fields(item: dict, lang: str) -> dict[str, str]:
    t = TEMPLATES[lang]
    ctx = item.get("context")
    opts = _options(item)
    return {
        "context": t["context"].format(context=ctx) if ctx else "",
        "question": str(item.get("question") or ""),
        "options": "\n".join(t["option_line"].format(letter=k, option=v) for k, v in opts.items()),
        "letters": t["letter_sep"].join(opts),
    }


def _render(tok: Any, turns: Sequence[tuple[str, str]], prefix: str, chat: bool) -> str:
    """Plain: the turns' texts concatenated + prefix. Chat: the tokenizer's chat template over the
    turns (roles user/assistant) with a generation prompt, then the prefix."""
    if not chat:
        return "".join(text for _, text in turns) + prefix
    if getattr(tok, "chat_template", None) is None:
        raise ValueError("chat=True but the tokenizer has no chat template")
    msgs = [{"role": role, "content": text.rstrip("\n")} for role, text in turns]
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + prefix


def _tasks_for(items: Sequence[dict], model: Any, task_ids: Any) -> list[Any] | None:
    if task_ids is False or (task_ids is None and not getattr(model, "accepts_task_ids", False)):
        return None
    if isinstance(task_ids, str):
        return [task_ids] * len(items)
    return [it.get("task") for it in items]


def _item_id(item: dict, i: int) -> Any:
    return item.get("id", i)


def _pad_id(tok: Any) -> int:
    pid = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pid is None:
        raise ValueError("tokenizer has neither a pad nor an eos token")
    return int(pid)


def _device(model: Any):
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return None


def _encode(tok: Any, text: str, special: bool) -> list[int]:
    return list(tok(text, add_special_tokens=special)["input_ids"])


def _forward(model: Any, state: dict, **kw):
    """model(**kw) with logits_to_keep when the model takes it (remembered in state)."""
    if state.get("no_keep"):
        kw.pop("logits_to_keep", None)
        return model(**kw)
    try:
        return model(**kw)
    except TypeError as e:
        if "logits_to_keep" not in str(e):
            raise
        state["no_keep"] = True
        kw.pop("logits_to_keep", None)
        return model(**kw)


# --- option perplexity -------------------------------------------------------------------------
def build_ppl_prompt(item: dict, lang: str = "auto", *, tok: Any = None, chat: bool = False
                     ) -> tuple[str, dict[str, str]]:
    """(prompt, {letter: continuation}) for option-perplexity scoring."""
    lg = _lang(item, lang)
    t = TEMPLATES[lg]
    f = _fields(item, lg)
    prompt = _render(tok, [("user", t["ppl_body"].format(**f))], t["ppl_prefix"], chat)
    opt_tpl = "{option}" if chat else t["ppl_option"]
    return prompt, {k: opt_tpl.format(option=v) for k, v in _options(item).items()}


def score_options_ppl(items: Sequence[dict], model: Any, tok: Any, *, batch_size: int = 16,
                      reduction: str = "mean", lang: str = "auto", chat: bool = False,
                      task_ids: Any = None, max_length: int | None = None,
                      share_prompt: bool = True) -> list[dict]:
    """Score every option of every item by the NLL of its tokens after the prompt; lowest wins.

    Returns per item ``{"id", "scores": {letter: nll}, "n_tokens": {letter: n}, "pred": letter}``
    (``scores`` = mean NLL per option token, or the sum with ``reduction="sum"``; an option that
    tokenises to nothing scores +inf). ``max_length`` truncates the prompt from the left.

    ``share_prompt=True`` (default): each prompt is run once (items batched, left padding, KV
    cache kept), the cache is gathered per option row (``Cache.reorder_cache``) and all options
    of the batch's items run as one right-padded batch on top of it; ``batch_size`` caps the
    option rows per batch (an item's options are never split). ``share_prompt=False``: every
    (item, option) pair is one right-padded sequence, ``batch_size`` sequences per forward.
    Both agree with one unpadded forward per option to float tolerance; the shared path
    computes each prompt once instead of once per option (bench/bench_option_scoring.py)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    tasks = _tasks_for(items, model, task_ids)
    prepared: list[tuple[list[int], dict[str, list[int]]]] = []
    results = []
    for i, item in enumerate(items):
        prompt, conts = build_ppl_prompt(item, lang, tok=tok, chat=chat)
        p_ids = _encode(tok, prompt, special=not chat)
        if not p_ids:
            raise ValueError(f"item {_item_id(item, i)!r}: empty prompt")
        c_all = {k: _encode(tok, c, special=False) for k, c in conts.items()}
        if max_length is not None:
            longest = max(len(c) for c in c_all.values())
            if len(p_ids) + longest > max_length:
                p_ids = p_ids[-max(1, max_length - longest):]
        prepared.append((p_ids, c_all))
        results.append({"id": _item_id(item, i), "scores": {}, "n_tokens": {}, "pred": None})
        for k, c in c_all.items():
            results[i]["n_tokens"][k] = len(c)
            if not c:
                results[i]["scores"][k] = float("inf")
    state: dict = {"no_cache": not share_prompt}
    if share_prompt:
        _ppl_shared(prepared, results, model, tok, tasks, batch_size, reduction, state)
    if state["no_cache"]:
        _ppl_flat(prepared, results, model, tok, tasks, batch_size, reduction, state)
    for i, res in enumerate(results):
        letters = list(_options(items[i]))
        res["scores"] = {k: res["scores"][k] for k in letters}
        res["pred"] = min(letters, key=lambda k: res["scores"][k])
    return results


def _to(kw: dict, device: Any) -> dict:
    if device is None:
        return kw
    return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in kw.items()}


def _ppl_flat(prepared, results, model, tok, tasks, batch_size, reduction, state) -> None:
    """One right-padded sequence per (item, option); labels on the option tokens only."""
    import torch
    import torch.nn.functional as F

    seqs = [(i, k, p + c, len(p)) for i, (p, cs) in enumerate(prepared) for k, c in cs.items() if c]
    device = _device(model)
    pad = _pad_id(tok)
    order = sorted(range(len(seqs)), key=lambda j: -len(seqs[j][2]))
    with torch.no_grad():
        for b0 in range(0, len(order), batch_size):
            chunk = [seqs[j] for j in order[b0:b0 + batch_size]]
            L = max(len(s[2]) for s in chunk)
            n = len(chunk)
            input_ids = torch.full((n, L), pad, dtype=torch.long)
            attn = torch.zeros((n, L), dtype=torch.long)
            labels = torch.full((n, L), -100, dtype=torch.long)
            for r, (_, _, ids, start) in enumerate(chunk):  # right padding
                input_ids[r, :len(ids)] = torch.tensor(ids)
                attn[r, :len(ids)] = 1
                labels[r, start:len(ids)] = input_ids[r, start:len(ids)]
            first = min(s[3] for s in chunk)               # earliest option token position
            keep = L - first + 1                           # logits at positions first-1 .. L-1
            kw = _to(dict(input_ids=input_ids, attention_mask=attn, logits_to_keep=keep), device)
            if tasks is not None:
                kw["task_ids"] = [tasks[s[0]] for s in chunk]
            logits = _forward(model, state, **kw).logits[:, -keep:, :]
            lab = labels[:, first:].to(logits.device)
            nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                  lab.reshape(-1), ignore_index=-100, reduction="none").view(n, -1)
            tot = nll.sum(-1)
            cnt = (lab != -100).sum(-1)
            for r, (i, k, _, _) in enumerate(chunk):
                results[i]["scores"][k] = float(tot[r] if reduction == "sum" else tot[r] / cnt[r])


def _ppl_shared(prepared, results, model, tok, tasks, batch_size, reduction, state) -> None:
    """Prompts once (left padding, KV cache), then every option on top of its prompt's cache."""
    import torch
    import torch.nn.functional as F

    device = _device(model)
    pad = _pad_id(tok)
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
    chunks: list[list[int]] = []
    rows_in = 0
    for i in order:  # items per batch: their option rows fill at most batch_size (>= 1 item)
        n_opt = sum(1 for c in prepared[i][1].values() if c)
        if chunks and rows_in + n_opt <= batch_size:
            chunks[-1].append(i)
            rows_in += n_opt
        else:
            chunks.append([i])
            rows_in = n_opt
    with torch.no_grad():
        for chunk in chunks:
            m = len(chunk)
            Lp = max(len(prepared[i][0]) for i in chunk)
            ids = torch.full((m, Lp), pad, dtype=torch.long)
            mask = torch.zeros((m, Lp), dtype=torch.long)
            for r, i in enumerate(chunk):  # left padding: every prompt ends at Lp - 1
                p = prepared[i][0]
                ids[r, Lp - len(p):] = torch.tensor(p)
                mask[r, Lp - len(p):] = 1
            plen = mask.sum(-1)
            kw = _to(dict(input_ids=ids, attention_mask=mask,
                          position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                          use_cache=True, logits_to_keep=1), device)
            if tasks is not None:
                kw["task_ids"] = [tasks[i] for i in chunk]
            out = _forward(model, state, **kw)
            past = getattr(out, "past_key_values", None)
            if past is None or not hasattr(past, "reorder_cache"):
                state["no_cache"] = True  # model without a reorderable cache: flat path
                return
            first_lp = torch.log_softmax(out.logits[:, -1, :].float(), -1)  # [m, V]
            rows = [(r, i, k, c) for r, i in enumerate(chunk) for k, c in prepared[i][1].items() if c]
            if not rows:
                continue
            n = len(rows)
            Lo = max(len(c) for *_, c in rows)
            opt = torch.full((n, Lo), pad, dtype=torch.long)
            omask = torch.zeros((n, Lo), dtype=torch.long)
            for j, (_, _, _, c) in enumerate(rows):  # right padding after the prompt
                opt[j, :len(c)] = torch.tensor(c)
                omask[j, :len(c)] = 1
            src = torch.tensor([r for r, *_ in rows])
            tgt = opt.to(first_lp.device)
            tok_nll = torch.zeros((n, Lo), device=first_lp.device)
            tok_nll[:, 0] = -first_lp[src.to(first_lp.device)].gather(1, tgt[:, :1]).squeeze(1)
            if Lo > 1:
                past.reorder_cache(src.to(device) if device is not None else src)
                kw2 = _to(dict(input_ids=opt[:, :-1], attention_mask=torch.cat([mask[src], omask[:, :-1]], 1),
                               position_ids=plen[src][:, None] + torch.arange(Lo - 1)[None, :],
                               past_key_values=past, use_cache=True), device)
                if tasks is not None:
                    kw2["task_ids"] = [tasks[i] for _, i, _, _ in rows]
                logits = _forward(model, state, **kw2).logits            # [n, Lo-1, V]
                tok_nll[:, 1:] = F.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), tgt[:, 1:].reshape(-1).to(logits.device),
                    reduction="none").view(n, Lo - 1).to(tok_nll.device)
            om = omask.to(tok_nll.device)
            tot = (tok_nll * om).sum(-1)
            cnt = om.sum(-1)
            for j, (_, i, k, _) in enumerate(rows):
                results[i]["scores"][k] = float(tot[j] if reduction == "sum" else tot[j] / cnt[j])


# --- answer-cue letter scoring -----------------------------------------------------------------
def letter_token_ids(tok: Any, letters: Sequence[str]) -> dict[str, list[int]]:
    """Candidate next-token ids per letter: first token of " X" and of "X", kept only if it decodes
    to exactly X (stripped) and belongs to no other letter. Raises if a letter keeps none."""
    cands: dict[str, set[int]] = {}
    for letter in letters:
        ids = set()
        for variant in (" " + letter, letter):
            enc = _encode(tok, variant, special=False)
            if enc and tok.decode([enc[0]]).strip() == letter:
                ids.add(int(enc[0]))
        cands[letter] = ids
    count = Counter(i for s in cands.values() for i in s)
    out = {k: sorted(i for i in s if count[i] == 1) for k, s in cands.items()}
    empty = [k for k, v in out.items() if not v]
    if empty:
        raise ValueError(f"no token of its own for letter(s) {empty} in this tokenizer")
    return out


def build_cue_prompt(item: dict, lang: str = "auto", *, tok: Any = None, chat: bool = False) -> str:
    lg = _lang(item, lang)
    t = TEMPLATES[lg]
    return _render(tok, [("user", t["cue_body"].format(**_fields(item, lg)))], t["cue"], chat)


def score_letters_cue(items: Sequence[dict], model: Any, tok: Any, *, batch_size: int = 16,
                      lang: str = "auto", chat: bool = False, task_ids: Any = None,
                      max_length: int | None = None) -> list[dict]:
    """Answer-cue scoring: per item ``{"id", "scores": {letter: logit}, "pred": letter}``, the
    valid letter with the highest next-token logit after the cue. ``max_length`` truncates the
    prompt from the left."""
    import torch

    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    tasks = _tasks_for(items, model, task_ids)
    all_letters = sorted({k for it in items for k in _options(it)})
    cand = letter_token_ids(tok, all_letters) if items else {}
    enc = []
    for i, item in enumerate(items):
        ids = _encode(tok, build_cue_prompt(item, lang, tok=tok, chat=chat), special=not chat)
        if max_length is not None:
            ids = ids[-max_length:]
        enc.append(ids)
    device = _device(model)
    pad = _pad_id(tok)
    results: list[dict | None] = [None] * len(items)
    order = sorted(range(len(items)), key=lambda k: -len(enc[k]))
    state: dict = {}
    with torch.no_grad():
        for b0 in range(0, len(order), batch_size):
            chunk = order[b0:b0 + batch_size]
            L = max(len(enc[k]) for k in chunk)
            n = len(chunk)
            input_ids = torch.full((n, L), pad, dtype=torch.long)
            attn = torch.zeros((n, L), dtype=torch.long)
            for r, k in enumerate(chunk):  # left padding
                input_ids[r, L - len(enc[k]):] = torch.tensor(enc[k])
                attn[r, L - len(enc[k]):] = 1
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            kw = dict(input_ids=input_ids, attention_mask=attn, position_ids=pos, logits_to_keep=1)
            if device is not None:
                kw = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in kw.items()}
            if tasks is not None:
                kw["task_ids"] = [tasks[k] for k in chunk]
            last = _forward(model, state, **kw).logits[:, -1, :].float().cpu()
            for r, k in enumerate(chunk):
                letters = list(_options(items[k]))
                scores = {x: float(last[r, cand[x]].max()) for x in letters}
                best = max(letters, key=lambda x: scores[x])
                results[k] = {"id": _item_id(items[k], k), "scores": scores, "pred": best}
    return results  # type: ignore[return-value]


# --- generation + VoC --------------------------------------------------------------------------
def generate_texts(model: Any, tok: Any, prompts: Sequence[str], *, max_new_tokens: int = 128,
                   batch_size: int = 8, tasks: Sequence[Any] | None = None,
                   add_special_tokens: bool = True, max_length: int | None = None) -> list[str]:
    """Greedy continuations of ``prompts`` (batched, left padding, sorted by length), decoded up
    to the first eos with special tokens skipped and surrounding whitespace stripped."""
    import torch

    from medpipe.stages.inference.runtime import left_padded_batches

    enc = [_encode(tok, p, special=add_special_tokens) for p in prompts]
    if max_length is not None:
        enc = [e[-max_length:] for e in enc]
    device = _device(model)
    pad = _pad_id(tok)
    eos = tok.eos_token_id
    eos_set = set(eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []))
    out: list[str] = [""] * len(prompts)
    with torch.no_grad():
        for chunk, input_ids, attn in left_padded_batches(enc, batch_size, pad):
            width = input_ids.shape[1]
            if device is not None:
                input_ids, attn = input_ids.to(device), attn.to(device)
            kw: dict[str, Any] = dict(input_ids=input_ids, attention_mask=attn,
                                      max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                      pad_token_id=pad)
            if eos is not None:
                kw["eos_token_id"] = eos
            if tasks is not None:
                kw["task_ids"] = [tasks[k] for k in chunk]
            gen = model.generate(**kw)[:, width:].tolist()
            for r, k in enumerate(chunk):
                toks = gen[r]
                for j, t in enumerate(toks):
                    if t in eos_set:
                        toks = toks[:j]
                        break
                out[k] = tok.decode(toks, skip_special_tokens=True).strip()
    return out


def parse_final_answer(text: str | None, valid_letters: Sequence[str]) -> tuple[str | None, str | None]:
    """Strict parse of 'Answer: X' (also 'answer：(X)', '答案：X'). Returns (letter, None) or
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


# --- accuracy ----------------------------------------------------------------------------------
def is_correct(item: dict, pred: str | None) -> bool:
    """A single predicted letter is correct iff the item's answer is exactly [pred]."""
    return pred is not None and sorted(item.get("answer") or []) == [pred]


def accuracy(items: Sequence[dict], results: Sequence[dict], key: str = "pred") -> float | None:
    """Accuracy over labeled items (answer non-empty); None when none is labeled."""
    pairs = [(it, r.get(key)) for it, r in zip(items, results) if it.get("answer")]
    if not pairs:
        return None
    return sum(is_correct(it, p) for it, p in pairs) / len(pairs)
