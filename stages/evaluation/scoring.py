"""Scoring multiple-choice items with a model (torch imported inside the functions):

* ``score_options_ppl`` - post-hoc option choice (AntGLM-Med): prompt = (context +) question, then
  each option's text as a continuation (prompts.build_ppl_prompt); the score of an option is the
  mean NLL of the option's tokens (``reduction="sum"``: summed NLL); the lowest score wins.
  Prompt and option are tokenised separately and concatenated (the separating space belongs to
  the option, as in lm-eval). ``score_continuations`` is the engine underneath, on token ids:
  the harness protocols (the protocols package) hand it their own (context, continuation) token splits.
  Default (``share_prompt=True``): the prompts of a batch of items run once (left padding,
  explicit position ids, KV cache, logits of the last position only), the cache is gathered per
  option row and all options run as one right-padded batch on top of it - each prompt is computed
  once, not once per option. ``share_prompt=False`` (also the automatic fallback for a model
  without a reorderable cache): every (item, option) pair is one right-padded sequence, labels
  only on the option tokens, logits only from the first option position on (``logits_to_keep``).
  Items/sequences are sorted by length; no Python loop runs a forward per option.
* ``letter_scores`` / ``letter_logits`` - answer-cue letter scoring (MedCare; the eval stage's
  ``cue`` method): the prompt (prompts.cue_prompt) lists the options and ends with an answer cue;
  the valid letter with the highest next-token score wins. A letter's candidate tokens
  (``letter_token_ids``) are the first token of ``" X"`` and of ``"X"`` (BPE tokenisers encode the
  two differently, SentencePiece ones may put "▁" first); a candidate is kept only if it decodes
  to exactly the letter (stripped) and is not a candidate of another letter; a letter's score is
  the max over its candidates. Batched with left padding, explicit position ids, logits of the
  last position only, a prefix shared by many prompts (k-shot) computed once.

Task ids (C-Poly): ``task_ids=None`` passes each item's ``task`` to models that accept task ids
(``model.accepts_task_ids``), nothing otherwise; ``True`` forces it, ``False`` never, a string
names one task for all items.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

from medpipe.stages.inference.runtime import encode_prompts, pad_id as _pad_id

from .prompts import build_ppl_prompt, options_of as _options

__all__ = ["accuracy", "is_correct", "letter_logits", "letter_scores", "letter_token_ids", "score_continuations",
           "score_options_ppl"]


def _tasks_for(items: Sequence[dict], model: Any, task_ids: Any) -> list[Any] | None:
    if task_ids is False or (task_ids is None and not getattr(model, "accepts_task_ids", False)):
        return None
    if isinstance(task_ids, str):
        return [task_ids] * len(items)
    return [it.get("task") for it in items]


def _item_id(item: dict, i: int) -> Any:
    return item.get("id", i)


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



def score_options_ppl(items: Sequence[dict], model: Any, tok: Any, *, batch_size: int = 16,
                      reduction: str = "mean", lang: str = "auto", chat: bool = False,
                      task_ids: Any = None, max_length: int | None = None,
                      share_prompt: bool = True) -> list[dict]:
    """Score every option of every item by the NLL of its tokens after the prompt; lowest wins.

    Returns per item ``{"id", "scores": {letter: nll}, "n_tokens": {letter: n}, "pred": letter}``
    (``scores`` = mean NLL per option token, or the sum with ``reduction="sum"``; an option that
    tokenises to nothing scores +inf). ``max_length`` truncates the prompt from the left.
    Batching: see score_continuations."""
    prepared = []
    for i, item in enumerate(items):
        prompt, conts = build_ppl_prompt(item, lang, tok=tok, chat=chat)
        p_ids = _encode(tok, prompt, special=not chat)
        if not p_ids:
            raise ValueError(f"item {_item_id(item, i)!r}: empty prompt")
        prepared.append((p_ids, {k: _encode(tok, c, special=False) for k, c in conts.items()}))
    results = score_continuations(prepared, model, tok, batch_size=batch_size, reduction=reduction,
                                  tasks=_tasks_for(items, model, task_ids), max_length=max_length,
                                  share_prompt=share_prompt)
    for i, res in enumerate(results):
        letters = list(_options(items[i]))
        res["id"] = _item_id(items[i], i)
        res["scores"] = {k: res["scores"][k] for k in letters}
        res["pred"] = min(letters, key=lambda k: res["scores"][k])
    return results


def score_continuations(prepared: Sequence[tuple[list[int], dict[str, list[int]]]], model: Any, tok: Any, *,
                        batch_size: int = 16, reduction: str = "mean", tasks: Sequence[Any] | None = None,
                        max_length: int | None = None, share_prompt: bool = True) -> list[dict]:
    """NLL of continuation tokens after a context, for [(context ids, {key: continuation ids})].

    Returns per context ``{"scores": {key: nll}, "n_tokens": {key: n}}`` (mean NLL per token, or
    the sum with ``reduction="sum"``; an empty continuation scores +inf). ``max_length`` cuts the
    context from the left so the longest continuation fits.

    ``share_prompt=True`` (default): each context is run once (batched, left padding, KV cache
    kept), the cache is gathered per continuation row (``Cache.reorder_cache``) and all
    continuations of the batch run as one right-padded batch on top of it; ``batch_size`` caps the
    continuation rows per batch (a context's continuations are never split). ``share_prompt=False``:
    every (context, continuation) pair is one right-padded sequence, ``batch_size`` per forward.
    Both agree with one unpadded forward per pair to float tolerance; the shared path computes
    each context once instead of once per continuation (bench/bench_option_scoring.py)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    cut: list[tuple[list[int], dict[str, list[int]]]] = []
    results = []
    for p_ids, c_all in prepared:
        if max_length is not None:
            longest = max(len(c) for c in c_all.values())
            if len(p_ids) + longest > max_length:
                p_ids = p_ids[-max(1, max_length - longest):]
        cut.append((list(p_ids), c_all))
        results.append({"scores": {k: float("inf") for k, c in c_all.items() if not c},
                        "n_tokens": {k: len(c) for k, c in c_all.items()}})
    state: dict = {"no_cache": not share_prompt}
    if share_prompt:
        _ppl_shared(cut, results, model, tok, tasks, batch_size, reduction, state)
    if state["no_cache"]:
        _ppl_flat(cut, results, model, tok, tasks, batch_size, reduction, state)
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
    for i in order:
        # items per batch: at most batch_size prompts, and their continuations of 2+ tokens (the rows
        # of the second forward) at most batch_size rows (>= 1 item); one-token continuations (letter
        # choices) are read off the prompt's last position and need no row
        n_opt = sum(1 for c in prepared[i][1].values() if len(c) > 1)
        if chunks and rows_in + n_opt <= batch_size and len(chunks[-1]) < batch_size:
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
            # the KV cache is kept only when a continuation has tokens after its first (letter
            # choices are read off the last position alone)
            need_cache = any(len(c) > 1 for i in chunk for c in prepared[i][1].values())
            kw = _to(dict(input_ids=ids, attention_mask=mask,
                          position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                          use_cache=need_cache, logits_to_keep=1), device)
            if tasks is not None:
                kw["task_ids"] = [tasks[i] for i in chunk]
            out = _forward(model, state, **kw)
            past = getattr(out, "past_key_values", None)
            if need_cache and (past is None or not hasattr(past, "reorder_cache")):
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
            multi = [j for j, (*_, c) in enumerate(rows) if len(c) > 1]  # rows with tokens after the first
            if multi:
                mj = torch.tensor(multi)
                msrc = src[mj]
                past.reorder_cache(msrc.to(device) if device is not None else msrc)
                kw2 = _to(dict(input_ids=opt[mj, :-1], attention_mask=torch.cat([mask[msrc], omask[mj, :-1]], 1),
                               position_ids=plen[msrc][:, None] + torch.arange(Lo - 1)[None, :],
                               past_key_values=past, use_cache=True), device)
                if tasks is not None:
                    kw2["task_ids"] = [tasks[rows[j][1]] for j in multi]
                logits = _forward(model, state, **kw2).logits            # [len(multi), Lo-1, V]
                tok_nll[mj.to(tok_nll.device), 1:] = F.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), tgt[mj.to(tgt.device), 1:].reshape(-1).to(logits.device),
                    reduction="none").view(len(multi), Lo - 1).to(tok_nll.device)
            om = omask.to(tok_nll.device)
            tot = (tok_nll * om).sum(-1)
            cnt = om.sum(-1)
            for j, (_, i, k, _) in enumerate(rows):
                results[i]["scores"][k] = float(tot[j] if reduction == "sum" else tot[j] / cnt[j])


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



def letter_scores(backend: Any, prompts: list[str], letters: list[list[str]], add_special_tokens: bool
                  ) -> list[dict[str, float]]:
    """Next-token score of every valid letter after each prompt, through an eval backend
    (medpipe.stages.inference.backends: logits on transformers, log-probabilities on vLLM)."""
    cand = letter_token_ids(backend.tok, sorted({x for ls in letters for x in ls}))
    per_prompt = [[t for x in ls for t in cand[x]] for ls in letters]
    scores = backend.next_token_scores(prompts, per_prompt, add_special_tokens)
    return [{x: max(sc[t] for t in cand[x]) for x in ls} for sc, ls in zip(scores, letters)]


def letter_logits(model: Any, tok: Any, prompts: list[str], letters: list[list[str]], batch_size: int = 16,
                  max_length: int | None = None, add_special_tokens: bool = True,
                  share_prefix: bool = True) -> list[dict[str, float]]:
    """letter_scores on an in-memory transformers model (tests, benchmarks, C-Poly): the logits."""
    from medpipe.stages.inference.backends import token_logits

    cand = letter_token_ids(tok, sorted({x for ls in letters for x in ls}))
    enc = encode_prompts(tok, prompts, add_special_tokens, max_length)
    scores = token_logits(model, enc, [[t for x in ls for t in cand[x]] for ls in letters], batch_size,
                          _pad_id(tok), share_prefix)
    return [{x: max(sc[t] for t in cand[x]) for x in ls} for sc, ls in zip(scores, letters)]


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

