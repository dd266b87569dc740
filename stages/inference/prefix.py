"""Next-token logits for many prompts, batched, computing each shared prompt prefix once.

k-shot prompts (C-Eval is reported 5-shot from its dev split) repeat the same solved examples in
front of every item of a subject: most of each prompt. Batched scoring that treats rows
independently recomputes that prefix for every row. Here prompts are grouped by their common
token prefix; a group's prefix runs once (batch 1, KV cache) and each batch of the group's
suffixes attends to a copy of that cache. Zero-shot prompts share next to nothing and take the
plain path: sorted by length, left-padded, logits of the last position only.

The split is made on token ids, so prefix + suffix is exactly the prompt's own tokenisation.
"""
from __future__ import annotations

import copy
from typing import Any, Iterator, Sequence

MIN_PREFIX = 32      # shorter shared prefixes are not worth a separate forward
MIN_SHARE = 0.5      # ... nor ones under half of the shorter prompt (chat system prompts, headers)
MIN_SAVED = 512      # ... nor groups that save fewer prefix tokens than two extra forwards cost


def common_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def prefix_groups(enc: Sequence[Sequence[int]], min_prefix: int = MIN_PREFIX, min_share: float = MIN_SHARE,
                  min_saved: int = MIN_SAVED) -> list[tuple[int, list[int]]]:
    """[(prefix length, prompt indices)]: runs of prompts (in token order) whose common prefix is
    >= min_prefix tokens and >= min_share of each prompt, and saves >= min_saved tokens in all
    ((size − 1) × prefix); every prompt keeps >= 1 token of its own. Prompts in no such run come
    last as one group with prefix length 0."""
    order = sorted(range(len(enc)), key=lambda k: list(enc[k]))
    groups: list[tuple[int, list[int]]] = []
    rest: list[int] = []
    run: list[int] = []
    lcp = 0

    def close() -> None:
        plen = min(lcp, min(len(enc[k]) for k in run) - 1)
        if len(run) > 1 and plen >= min_prefix and (len(run) - 1) * plen >= min_saved:
            groups.append((plen, list(run)))
        else:
            rest.extend(run)

    for k in order:
        if run:
            prev = run[-1]
            n = common_len(enc[prev], enc[k])
            if n >= min_prefix and n >= min_share * min(len(enc[prev]), len(enc[k])):
                run.append(k)
                lcp = min(lcp, n)
                continue
            close()
        run, lcp = [k], len(enc[k])
    if run:
        close()
    return groups + ([(0, rest)] if rest else [])


def supports_prefix_cache(model: Any) -> bool:
    """Models implemented in transformers take a Cache object; remote-code models may expect the
    legacy tuple format, so they take the plain path."""
    return type(model).__module__.startswith("transformers.")


def last_token_logits(model: Any, enc: Sequence[Sequence[int]], batch_size: int, pad: int,
                      share_prefix: bool = True) -> Iterator[tuple[list[int], Any]]:
    """Yield (prompt indices, float32 CPU logits [rows, vocab] at each prompt's last token)."""
    import torch

    from medpipe.stages.inference.runtime import left_padded_batches

    device = next(model.parameters()).device
    groups = prefix_groups(enc) if share_prefix and supports_prefix_cache(model) else [(0, list(range(len(enc))))]
    with torch.inference_mode():
        for plen, idx in groups:
            cache = None
            if plen:
                prefix = torch.tensor([list(enc[idx[0]][:plen])], device=device)
                cache = model(input_ids=prefix, use_cache=True, logits_to_keep=1).past_key_values
            for chunk, ids, attn in left_padded_batches([enc[k][plen:] for k in idx], batch_size, pad):
                pos = (attn.cumsum(-1) - 1).clamp(min=0) + plen
                kw: dict = dict(input_ids=ids.to(device), position_ids=pos.to(device), use_cache=False)
                if cache is not None:
                    rows = copy.deepcopy(cache)
                    rows.batch_repeat_interleave(len(chunk))
                    attn = torch.cat([torch.ones(len(chunk), plen, dtype=attn.dtype), attn], dim=1)
                    kw.update(past_key_values=rows, use_cache=True)
                kw["attention_mask"] = attn.to(device)
                try:
                    logits = model(**kw, logits_to_keep=1).logits[:, -1, :]
                except TypeError:  # forward without logits_to_keep
                    logits = model(**kw).logits[:, -1, :]
                yield [idx[r] for r in chunk], logits.float().cpu()
