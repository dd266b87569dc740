"""One prefill forward for several prompts without padding, computing their shared prefix once.

The continuous loop's prefill used to left-pad the waiting prompts to the longest (on the serve
benchmark's prompts 44 % of the forward's tokens were padding) and to recompute the chat template's
system prompt in every row. Here the prompts are packed into one row: first the part of their common
token prefix that is not already cached (`shared`: every prompt attends to it), then each prompt's own
tokens (attending to the prefix and, causally, to themselves only: a block-diagonal 4-D mask). The
prefix's keys and values may come from an earlier prompt (`PrefixStore`: keys and values at a position
depend only on the tokens up to it, so the cached part of a previous prompt is exact for any prompt
that begins with the same tokens). Afterwards each prompt's cache (prefix + own tokens) is gathered
into the left-padded rows × width layout of the running batch.

Light at import: torch is imported inside the functions.
"""
from __future__ import annotations

from typing import Any, Sequence

MIN_SHARED = 8  # a shorter common prefix is not worth the bookkeeping


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix all of `seqs` begin with."""
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


class PrefixStore:
    """The keys and values (batch 1, per layer) of the most recent prompt prefilled: the next prompts'
    common prefix with it (a chat template's system prompt, a few-shot header) is not computed again."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.layers: list[tuple[Any, Any]] = []

    def usable(self, prompts: Sequence[Sequence[int]], upto: int) -> int:
        """How many leading tokens of every prompt the store holds (at most `upto`; 0 when under MIN_SHARED)."""
        if not self.ids:
            return 0
        n = min(common_prefix([self.ids, *prompts]), upto)
        return n if n >= MIN_SHARED else 0

    def keep(self, ids: Sequence[int], layers: list[tuple[Any, Any]]) -> None:
        self.ids, self.layers = list(ids), layers


def plan(prompts: Sequence[Sequence[int]], store: PrefixStore | None) -> tuple[int, int]:
    """(cached, shared): the first `cached` tokens of every prompt come from the store, tokens
    cached..shared (common to all) are computed once; every prompt keeps at least one token of its own."""
    upto = min(len(p) for p in prompts) - 1
    shared = common_prefix(prompts) if len(prompts) > 1 else 0
    shared = min(shared, upto) if shared >= MIN_SHARED else 0
    cached = store.usable(prompts, upto) if store is not None else 0
    return cached, max(shared, cached)


def packed_inputs(prompts: Sequence[Sequence[int]], cached: int, shared: int, attn: str | None, dtype: Any):
    """(input_ids 1 × T, position_ids 1 × T, the 4-D mask 1 × 1 × T × (cached + T), each prompt's
    (start, length) of its own tokens, `start` counted from the end of the shared part: in the packed
    row they begin at shared − cached + start, in the forward's cache at shared + start)."""
    import torch

    own = [list(p[shared:]) for p in prompts]
    lens = [len(o) for o in own]
    head = list(prompts[0][cached:shared])
    ids = torch.tensor([head + [t for o in own for t in o]])
    pos = torch.cat([torch.arange(cached, shared)] + [torch.arange(shared, shared + n) for n in lens])[None]
    # segment of every packed token: -1 for the shared part, else the prompt's index
    seg = torch.cat([torch.full((len(head),), -1)] + [torch.full((n,), i) for i, n in enumerate(lens)])
    T = len(seg)
    allowed = (seg[None, :] == seg[:, None]) | (seg[None, :] == -1)
    allowed &= torch.ones(T, T, dtype=torch.bool).tril()
    allowed = torch.cat([torch.ones(T, cached, dtype=torch.bool), allowed], 1)[None, None]
    if attn == "eager":  # additive, as transformers' eager masks are
        allowed = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    starts, at = [], 0
    for n in lens:
        starts.append(at)
        at += n
    return ids, pos, allowed, list(zip(starts, lens))


def gather_rows(shared: int, spans: list[tuple[int, int]]) -> tuple[Any, Any]:
    """Where the packed forward's cache (batch 1: shared prefix, then every prompt's own tokens) has each row:
    each prompt's prefix + own tokens, left-padded to the longest: (the cache column of every row's
    position, rows × width; the attention mask, rows × width). Padded positions point at column 0
    (masked out)."""
    import torch

    width = shared + max(n for _, n in spans)
    index, mask = [], []
    for start, n in spans:
        pad = width - shared - n
        index.append([0] * pad + list(range(shared)) + list(range(shared + start, shared + start + n)))
        mask.append([0] * pad + [1] * (shared + n))
    return torch.tensor(index), torch.tensor(mask)


SLACK = 64  # cache columns allocated ahead: one reallocation per 64 decoding steps, not one per step


def slack_layer_class() -> type:
    """transformers' DynamicLayer whose `update` writes a step's keys and values into room allocated
    ahead instead of concatenating: the growing cache's `torch.cat` copied every layer's whole cache
    on every decoding step (13 % of a SmolLM2 step at batch 8). `keys`/`values` stay views of the first
    columns, so code that replaces them (a row joining or leaving) only costs one reallocation later."""
    from transformers.cache_utils import DynamicLayer

    class SlackLayer(DynamicLayer):
        room: tuple = (None, None)

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if not self.is_initialized or self.keys.dim() != 4:
                return super().update(key_states, value_states, *args, **kwargs)
            n, add = self.keys.shape[-2], key_states.shape[-2]
            kb, vb = self.room
            if kb is None or kb.shape[-2] < n + add or kb.shape[:2] != self.keys.shape[:2] \
                    or self.keys.data_ptr() != kb.data_ptr() or self.values.data_ptr() != vb.data_ptr():
                b, h, _, d = self.keys.shape
                kb = self.keys.new_empty(b, h, n + add + SLACK, d)
                vb = self.values.new_empty(b, h, n + add + SLACK, self.values.shape[-1])
                kb[:, :, :n], vb[:, :, :n] = self.keys, self.values
                self.room = (kb, vb)
            kb[:, :, n:n + add], vb[:, :, n:n + add] = key_states, value_states
            self.keys, self.values = kb[:, :, :n + add], vb[:, :, :n + add]
            return self.keys, self.values

    return SlackLayer
