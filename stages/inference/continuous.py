"""Continuous (iteration-level) batching for `medpipe serve`: requests join the running batch at the
next decoding step and leave it when they finish, instead of waiting for a whole batch to end.

One loop thread owns the model. Each iteration runs at most one prefill forward (every short prompt
waiting, packed into one row without padding, their common prefix computed once and the part of it
the last prompt left cached not at all: packed.py; or the next `prefill_chunk` tokens of one long
prompt, so a 4k-token prompt does not stall the others) and one decode forward for every running row. The running rows share
one left-padded KV cache (transformers' `DynamicCache`): a prefilled prompt's cache is padded and
concatenated on the batch dimension, a finished row is dropped and the columns every row pads are cut.
Positions and the attention mask are kept per row, so each row computes what it would alone (as the
static micro-batcher's left-padded `generate` does); `check()` re-checks greedy answers against
`LocalModel.generate` on probe prompts when the server starts, and a model it would answer
differently for is served the static way.

Why not transformers' `ContinuousBatchingManager` (used until session 5): its pure-Python scheduler
cost ≈ 17 % of every step on CPU, which ate what batching gains at concurrency 8 (BENCHMARKS.md, serve).
The price of this design is a copy of the cache when a prompt joins; a paged cache (vLLM:
`medpipe serve --engine vllm`) avoids it on GPUs.

Greedy only: sampled requests keep their seeded, one-at-a-time path (a shared batch would share
the random stream). Non-streamed requests get a Future of a `Completion`; streamed ones also get the
tokens so far after every step (`on_tokens`, called on the loop thread). When a forward raises, every
request in the batch or in prefill fails with that error and the loop goes on with the next ones.

Light at import: torch/transformers are imported inside the functions that use them.
"""
from __future__ import annotations

import collections
import inspect
import itertools
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from medpipe.errors import MedpipeError

from .packed import PrefixStore
from .runtime import Completion, find_stop, held_back, left_padded_batches, pad_id, top_logprobs, visible_text


class GenerationFailed(MedpipeError):
    """The batched generation loop failed while this request was in flight."""


@dataclass
class EngineRequest:
    rid: str
    ids: list[int]
    max_new_tokens: int
    on_tokens: Callable[[list[int]], None] | None = None  # streamed: the tokens so far (loop thread)
    future: Future = field(default_factory=Future)
    tokens: list[int] = field(default_factory=list)  # generated so far (a stop token last when stopped)
    stopped: bool = False  # by a stop token
    cancelled: bool = False
    stop: tuple = ()  # stop strings: the request ends once its text holds one
    logprobs: int | None = None  # top-k log-probabilities per token (0: the chosen token's only)
    echo: bool = False  # the prompt tokens' log-probabilities too (scoring, /v1/completions)
    strip: bool = True  # chat text is stripped; completions text is returned raw
    lps: list = field(default_factory=list)  # per generated token (id, logprob, top-k) with logprobs on
    prompt_lps: list | None = None
    stop_hit: bool = False  # its text reached a stop string


def unsupported(local: Any) -> str | None:
    """Why this model cannot be served with continuous batching (None: it can)."""
    model = getattr(local, "model", None)
    if not hasattr(model, "config") or not hasattr(local, "stop_ids") or not hasattr(local, "tok"):
        return "the model is not a transformers PreTrainedModel"
    if "task_ids" in inspect.signature(model.forward).parameters:
        return "the model takes task ids"
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        layers = DynamicCache(config=model.config).layers
    except Exception as e:
        return f"no dynamic cache for this model ({type(e).__name__}: {e})"
    if any(type(layer) is not DynamicLayer for layer in layers):
        return "its cache has sliding-window or other non-growing layers"
    return None


def kv_bytes_per_token(config: Any, dtype_size: int) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * dtype_size


class TextPieces:
    """Text of a growing token list, piece by piece, joining to exactly `Completion.text`
    (decode(tokens).strip() for chat, raw for completions): leading whitespace dropped, trailing
    whitespace, an unfinished multi-byte character and what could begin a stop string held back
    until more text follows; nothing from a stop string on."""

    def __init__(self, tok: Any, stop_ids: set[int], stop: tuple = (), strip: bool = True):
        self.tok, self.stops, self.sent, self.stop, self.strip = tok, stop_ids, "", stop, strip
        self.covered = 0  # leading tokens whose text lies wholly in the text sent (their logprobs may go)

    def _text(self, tokens: list[int]) -> str:
        text = self.tok.decode(tokens, skip_special_tokens=True)
        return text.lstrip() if self.strip else text

    def cover(self, tokens: list[int]) -> int:
        """How many leading tokens the text sent so far holds whole: a token of held-back text (a stop
        string's start, trailing whitespace, half a character) is not covered until its text is sent,
        and one of a stop string never is (the final Completion's logprobs end where its text ends)."""
        while self.covered < len(tokens) and tokens[self.covered] not in self.stops \
                and len(self._text(tokens[:self.covered + 1])) <= len(self.sent):
            self.covered += 1
        return self.covered

    def feed(self, tokens: list[int]) -> str:
        cut = next((j for j, t in enumerate(tokens) if t in self.stops), len(tokens))
        text = self._text(tokens[:cut])
        if text.endswith("\ufffd"):
            return ""
        if self.stop:
            at = find_stop(text, self.stop)
            text = text[:at] if at >= 0 else text[:len(text) - held_back(text, self.stop)]
        body = text.rstrip() if self.strip else text
        if not body.startswith(self.sent) or len(body) == len(self.sent):
            return ""
        piece, self.sent = body[len(self.sent):], body
        return piece

    def finish(self, done: Completion) -> str:
        """What the pieces sent so far lack of the final text."""
        if done.text.startswith(self.sent) and len(done.text) > len(self.sent):
            rest, self.sent = done.text[len(self.sent):], done.text
            return rest
        return ""


class ContinuousEngine:
    """Greedy generation for many concurrent requests through one continuously batched model: one
    thread owns the model and runs `_loop` (at most one prefill forward and one decode forward per
    iteration); requests come in through `submit` and leave with their Future set."""

    def __init__(self, local: Any, max_batch: int = 32, context: int = 4096, kv_cache_mb: int = 1024,
                 prefill_chunk: int = 256, prefill_tokens: int = 1024):
        self.local, self.model = local, local.model
        self.max_batch = max(1, max_batch)
        self.stops = set(local.stop_ids)
        self.pad = pad_id(local.tok)
        per_token = kv_bytes_per_token(self.model.config, self.model.dtype.itemsize)
        # the padded cache's budget in tokens (rows × width): one full-context request fits at least
        self.cache_tokens = max((kv_cache_mb << 20) // per_token, context + 1)
        self.prefill_chunk = max(16, prefill_chunk)  # a longer prompt is prefilled a chunk per iteration
        self.prefill_tokens = max(self.prefill_chunk, prefill_tokens)  # padded tokens of one prefill forward
        self.keep_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self.device = next(self.model.parameters()).device
        self.attn = getattr(self.model.config, "_attn_implementation", None)
        self.pending: dict[str, EngineRequest] = {}  # submitted and not finished (waiting or in the batch)
        self.inbox: collections.deque[EngineRequest] = collections.deque()
        self.wake = threading.Condition()
        self.ids = itertools.count()
        self.steps = 0  # forward passes of the loop (tests: shared steps, not one per request)
        self.restarts = 0  # forwards that raised: their requests failed, the loop went on
        self.closed = False
        self.batch = Batch()
        self.filling: list[Prefill] = []  # admitted, prompt not yet (fully) in the cache
        self.prefix = PrefixStore()  # the last prompt prefilled: the next ones' common prefix with it is reused
        self.thread = threading.Thread(target=self._loop, name="medpipe-cb-loop", daemon=True)
        self.thread.start()

    # --- requests ---------------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self.pending)

    def submit(self, ids: list[int], max_new_tokens: int, on_tokens: Callable[[list[int]], None] | None = None,
               max_length: int | None = None, stop: tuple = (), logprobs: int | None = None, echo: bool = False,
               strip: bool = True) -> EngineRequest:
        """A request; `max_new_tokens` 0 (with `echo`: scoring the prompt) ends after its prefill."""
        if self.closed:
            raise GenerationFailed("the engine is closed")
        ids = list(ids[-max_length:] if max_length else ids)
        if not ids:
            raise GenerationFailed("the prompt has no tokens")
        req = EngineRequest(f"mp-{next(self.ids)}", ids, max(0, int(max_new_tokens)), on_tokens, stop=tuple(stop),
                            logprobs=logprobs, echo=echo, strip=strip)
        with self.wake:
            self.pending[req.rid] = req
            self.inbox.append(req)
            self.wake.notify()
        return req

    def stream(self, ids: list[int], max_new_tokens: int, max_length: int | None = None,
               deadline: float | None = None, **opts: Any) -> "EngineStream":
        """A streamed request, for a caller on an asyncio loop: `async for x in engine.stream(...)`
        yields text pieces as the batch produces tokens, then the Completion."""
        import asyncio

        return EngineStream(self, asyncio.get_running_loop(), ids, max_new_tokens, max_length, deadline, opts)

    def cancel(self, req: EngineRequest) -> None:
        """Stop generating for a request nobody waits for any more (timed out, client gone): it leaves
        the batch at the next iteration."""
        req.cancelled = True
        with self.wake:
            self.pending.pop(req.rid, None)
            self.wake.notify()
        req.future.cancel()

    def generate_ids(self, enc: list[list[int]], max_new_tokens: int, timeout: float | None = None) -> list[Completion]:
        """Blocking: every prompt through the shared batch (probe, tests)."""
        reqs = [self.submit(e, max_new_tokens) for e in enc]
        return [r.future.result(timeout=timeout) for r in reqs]

    def check(self, probes: list[list[int]], max_new_tokens: int = 8) -> str | None:
        """None when the batch gives `LocalModel.generate_ids`'s greedy answers on these prompts, else why not."""
        try:
            got = self.generate_ids(probes, max_new_tokens, timeout=120)
        except Exception as e:  # the model does not run this way: served the static way instead
            return f"continuous batching failed on a probe: {type(e).__name__}: {e}"
        want = self.local.generate_ids(probes, max_new_tokens=max_new_tokens, batch_size=1)
        if [(g.text, g.completion_tokens) for g in got] != [(w.text, w.completion_tokens) for w in want]:
            return "continuous batching answered a probe differently from sequential generation"
        return None

    def completion(self, req: EngineRequest) -> Completion:
        toks = req.tokens[:-1] if req.stopped else req.tokens
        if not req.stop and req.strip:  # the common case: one decode
            text, covered = self.local.tok.decode(toks, skip_special_tokens=True).strip(), None
        else:
            text, covered = visible_text(self.local.tok, toks, req.stop, req.strip)
        if covered is not None:
            toks = toks[:covered]
        return Completion(text, "stop" if req.stopped or covered is not None else "length", len(req.ids), len(toks),
                          req.lps[:len(toks)] if req.logprobs is not None else None, req.prompt_lps, req.ids)

    def close(self) -> None:
        if self.closed:
            return
        with self.wake:
            self.closed = True
            self.wake.notify()
        self.thread.join(timeout=5)
        self._fail(list(self.pending.values()), "the server is shutting down")

    # --- the loop ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        import torch

        while True:
            with self.wake:
                while not self.closed and not self.inbox and not self.filling and not self.batch.rows:
                    self.wake.wait()
                if self.closed:
                    return
                self._admit()
            try:
                # inference_mode, not no_grad: ≈ 15 % less per decode step on CPU (no autograd bookkeeping);
                # the loop's tensors never meet autograd (LocalModel keeps no_grad: a training stage's VoC
                # generates with the model it trains, and lazily rebuilt buffers must stay usable there)
                with torch.inference_mode():
                    if self._prefill_due():
                        self._prefill()
                    if self.batch.rows:
                        self._decode()
                        for f in self.filling:
                            f.waited += 1
            except Exception as e:  # a forward raised: its requests fail, the next ones start afresh
                self.restarts += 1
                self._fail([f.req for f in self.filling] + self.batch.rows, str(e) or type(e).__name__)
                self.filling, self.batch = [], Batch()

    def _admit(self) -> None:
        """Move waiting requests into prefill while the batch has rows and cache room for them (called
        with the lock held)."""
        while self.inbox:
            req = self.inbox[0]
            if req.cancelled:
                self.inbox.popleft()
                continue
            rows = len(self.batch.rows) + len(self.filling)
            width = max(self.batch.width, *(len(f.req.ids) + f.req.max_new_tokens for f in self.filling), 0)
            need = (rows + 1) * max(width, len(req.ids) + req.max_new_tokens)
            if rows >= self.max_batch or (rows and need > self.cache_tokens):
                return
            self.filling.append(Prefill(self.inbox.popleft()))

    def _prefill_due(self) -> bool:
        """Prefill now, or decode once more first: a prompt that arrived while rows are decoding waits one
        step, so the ones arriving just after it (clients answered in the same step send their next
        request together) are prefilled with it in one forward instead of one forward each."""
        if not self.filling:
            return False
        return not self.batch.rows or any(f.waited or f.done for f in self.filling) \
            or len(self.batch.rows) + len(self.filling) >= self.max_batch

    def _forward(self, all_logits: bool = False, keep: Any = 1, **kw: Any) -> Any:
        if self.keep_logits and not all_logits:
            kw["logits_to_keep"] = keep
        self.steps += 1
        return self.model(use_cache=True, **kw)

    def _prefill(self) -> None:
        """One prefill forward: every short prompt waiting (left-padded together, up to `prefill_tokens`
        padded tokens), or else the next chunk of one long prompt. Finished prompts join the batch."""
        import torch
        from transformers import DynamicCache

        self.filling = [f for f in self.filling if not f.req.cancelled]
        short = [f for f in self.filling if f.done == 0 and len(f.req.ids) <= self.prefill_chunk]
        group: list[Prefill] = []
        for f in sorted(short, key=lambda f: -len(f.req.ids)):
            if (len(group) + 1) * len(group[0].req.ids if group else f.req.ids) > self.prefill_tokens:
                break
            group.append(f)
        if group and self.attn in ("sdpa", "eager"):  # kernels that take a 4-D mask: packed, no padding
            self._prefill_packed(group)
            return
        if group:
            # one left-padded batch, rows in the group's (longest-first) order
            _, ids, mask = next(left_padded_batches([f.req.ids for f in group], len(group), self.pad))
            ids, mask = ids.to(self.device), mask.to(self.device)
            cache = DynamicCache(config=self.model.config)
            echo = any(f.req.echo for f in group)
            out = self._forward(echo, input_ids=ids, attention_mask=mask,
                                position_ids=(mask.cumsum(1) - 1).clamp(min=0), past_key_values=cache)
            for r, f in enumerate(group):
                f.done = len(f.req.ids)
                if f.req.echo:  # each prompt token given the ones before it, from this same forward
                    start = ids.shape[1] - len(f.req.ids)
                    f.req.prompt_lps = [None] + top_logprobs(out.logits[r, start:-1], ids[r, start + 1:],
                                                             f.req.logprobs or 0)
            self._join(group, out.past_key_values, mask, out.logits[:, -1])
            return
        f = self.filling[0]  # a long prompt: its next chunk, with its own cache
        if f.cache is None:
            f.cache = DynamicCache(config=self.model.config)
        end = min(len(f.req.ids), f.done + self.prefill_chunk)
        chunk = torch.tensor([f.req.ids[f.done:end]], device=self.device)
        mask = torch.ones(1, end, dtype=torch.long, device=self.device)
        out = self._forward(f.req.echo, input_ids=chunk, attention_mask=mask,
                            position_ids=torch.arange(f.done, end, device=self.device)[None], past_key_values=f.cache)
        if f.req.echo:  # the previous chunk's last logits predict this chunk's first token
            k = f.req.logprobs or 0
            if f.last is None:
                f.req.prompt_lps = [None]
            else:
                f.req.prompt_lps += top_logprobs(f.last, chunk[0, :1], k)
            f.req.prompt_lps += top_logprobs(out.logits[0, :-1], chunk[0, 1:], k)
            f.last = out.logits[:1, -1]
        f.done = end
        if end == len(f.req.ids):
            self._join([f], out.past_key_values, mask, out.logits[:, -1])

    def _prefill_packed(self, group: list["Prefill"]) -> None:
        """The group's prompts in one forward without padding (packed.py): their common prefix once,
        the part of it an earlier prompt left in `self.prefix` not at all; then each prompt's cache
        gathered into the left-padded rows the batch keeps."""
        import torch
        from transformers import DynamicCache

        from .packed import gather_rows, packed_inputs, plan

        prompts = [f.req.ids for f in group]
        echo = any(f.req.echo for f in group)  # every prompt position's logits: nothing shared or cached
        cached, shared = (0, 0) if echo else plan(prompts, self.prefix)
        ids, pos, mask4, spans = packed_inputs(prompts, cached, shared, self.attn, self.model.dtype)
        cache = DynamicCache(config=self.model.config)
        for i, (k, v) in enumerate(self.prefix.layers if cached else ()):
            cache.update(k[:, :, :cached], v[:, :, :cached], i)
        head = shared - cached  # packed tokens before the prompts' own ones
        last = torch.tensor([head + s + n - 1 for s, n in spans], device=self.device)
        out = self._forward(echo, keep=last, input_ids=ids.to(self.device), attention_mask=mask4.to(self.device),
                            position_ids=pos.to(self.device), past_key_values=cache)
        logits = out.logits[0]
        if echo or not self.keep_logits:  # every packed position's logits came back
            for f, (s, n) in zip(group, spans):
                if f.req.echo:  # each prompt token given the ones before it, from this same forward
                    f.req.prompt_lps = [None] + top_logprobs(logits[s:s + n - 1], ids[0, s + 1:s + n].to(self.device),
                                                             f.req.logprobs or 0)
            logits = logits[last]
        for f in group:
            f.done = len(f.req.ids)
        index, mask = gather_rows(shared, spans)
        index, mask = index.to(self.device), mask.to(self.device)
        for layer in out.past_key_values.layers:  # (1, heads, columns, dim) → (rows, heads, width, dim)
            layer.keys = layer.keys[0][:, index].transpose(0, 1).contiguous()
            layer.values = layer.values[0][:, index].transpose(0, 1).contiguous()
        pad = int(mask.shape[1]) - len(prompts[-1])  # the last prompt's cache row, unpadded, for the next ones
        self.prefix.keep(prompts[-1], [(layer.keys[-1:, :, pad:].clone(), layer.values[-1:, :, pad:].clone())
                                       for layer in out.past_key_values.layers])
        self._join(group, out.past_key_values, mask, logits)

    def _join(self, group: list["Prefill"], cache: Any, mask: Any, logits: Any) -> None:
        """Prefilled prompts (their cache, mask and the logits of their first token) into the running
        batch; a request for no new tokens (scoring) ends here."""
        import torch

        self.filling = [f for f in self.filling if f not in group]
        reqs = [f.req for f in group]
        scored = [r for r in reqs if r.max_new_tokens == 0]
        if scored:
            self._finish(scored)
            keep = [i for i, r in enumerate(reqs) if r.max_new_tokens > 0]
            if not keep:
                return
            index = torch.tensor(keep, device=mask.device)
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[index], layer.values[index]
            reqs, mask, logits = [reqs[i] for i in keep], mask[index], logits[index]
            lead = int(mask.argmax(1).min())  # columns every kept row pads
            if lead:
                for layer in cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
                mask = mask[:, lead:]
        first = logits.argmax(-1)
        self.batch.merge(reqs, cache, mask, first)
        self._emit(first.tolist(), reqs, self._logprobs(reqs, logits, first))

    def _logprobs(self, rows: list[EngineRequest], logits: Any, chosen: Any) -> list | None:
        """Per row, the chosen token's (id, logprob, top-k) where the row asked for them (same logits)."""
        want = [i for i, r in enumerate(rows) if r.logprobs is not None]
        if not want:
            return None
        k = max(rows[i].logprobs for i in want)
        index = chosen.new_tensor(want)
        got = top_logprobs(logits[index], chosen[index], k)
        out: list = [None] * len(rows)
        for i, g in zip(want, got):
            out[i] = (g[0], g[1], g[2][:rows[i].logprobs])
        return out

    def _finish(self, reqs: list[EngineRequest]) -> None:
        with self.wake:
            for req in reqs:
                self.pending.pop(req.rid, None)
        for req in reqs:
            if not req.future.done():
                req.future.set_result(self.completion(req))

    def _decode(self) -> None:
        """One decoding step for every row of the batch."""
        b = self.batch
        b.grow()
        out = self._forward(input_ids=b.last[:, None], attention_mask=self._step_mask(b), position_ids=b.pos[:, None] - 1,
                            past_key_values=b.cache)
        b.cache = out.past_key_values
        logits = out.logits[:, -1]
        nxt = logits.argmax(-1)
        b.last = nxt
        rows = list(b.rows)
        self._emit(nxt.tolist(), rows, self._logprobs(rows, logits, nxt))

    def _step_mask(self, b: "Batch") -> Any:
        """The decode step's attention mask, built here rather than by the model from the 2-D mask every
        step: for one query token it is the padding mask itself, as transformers' sdpa (boolean) and eager
        (additive) masks come to; none when no row pads, as transformers then passes none."""
        import torch

        if not b.padded:
            return None
        if self.attn == "sdpa":
            return b.mask[:, None, None, :].bool()
        if self.attn == "eager":
            dtype = self.model.dtype
            return torch.zeros(b.mask.shape, dtype=dtype, device=b.mask.device).masked_fill_(
                b.mask == 0, torch.finfo(dtype).min)[:, None, None, :]
        return b.mask  # other kernels (flash): the model builds its own from the 2-D mask

    def _emit(self, tokens: list[int], rows: list[EngineRequest], lps: list | None = None) -> None:
        """Each row's new token: streamed, finished (stop token or string, max_new_tokens) or cancelled rows leave."""
        gone = []
        for i, (req, t) in enumerate(zip(rows, tokens)):
            if req.cancelled:
                gone.append(req)
                continue
            req.tokens.append(t)
            if lps is not None and lps[i] is not None:
                req.lps.append(lps[i])
            req.stopped = t in self.stops
            if req.stop and not req.stopped:
                text = self.local.tok.decode(req.tokens, skip_special_tokens=True)
                req.stop_hit = find_stop(text.lstrip() if req.strip else text, req.stop) >= 0
            finished = req.stopped or req.stop_hit or len(req.tokens) >= req.max_new_tokens
            try:
                if finished:
                    with self.wake:
                        self.pending.pop(req.rid, None)
                    if not req.future.done():
                        req.future.set_result(self.completion(req))
                elif req.on_tokens is not None:
                    req.on_tokens(list(req.tokens))
            except Exception as e:  # a listener's failure ends its own request only
                finished = True
                self._fail([req], f"{type(e).__name__}: {e}")
            if finished:
                gone.append(req)
        if gone:
            self.batch.drop(set(map(id, gone)))

    def _fail(self, reqs: list[EngineRequest], why: str) -> None:
        with self.wake:
            for req in reqs:
                self.pending.pop(req.rid, None)
        for req in reqs:
            if not req.future.done():
                req.future.set_exception(GenerationFailed(why))


@dataclass
class Prefill:
    req: EngineRequest
    done: int = 0  # prompt tokens in `cache` so far (a long prompt is prefilled chunk by chunk)
    cache: Any = None
    waited: int = 0  # decode steps run since it was admitted
    last: Any = None  # echo of a chunked prompt: the last chunk's final logits (they predict the next chunk's first token)


class Batch:
    """The running rows: one left-padded KV cache (transformers' DynamicCache, rows × width), its
    attention mask, each row's last token (the next input) and its next position."""

    def __init__(self) -> None:
        self.rows: list[EngineRequest] = []
        self.cache: Any = None
        self.mask: Any = None
        self.last: Any = None
        self.pos: Any = None
        self.padded = False  # some row's cache has left padding

    @property
    def width(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    def grow(self) -> None:
        """The mask and positions of the step about to run (its input token included)."""
        import torch

        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], 1)
        self.pos = self.pos + 1

    def merge(self, reqs: list[EngineRequest], cache: Any, mask: Any, first: Any) -> None:
        import torch

        from .packed import slack_layer_class

        pos = mask.sum(1)
        if not self.rows:
            slack = slack_layer_class()
            for layer in cache.layers:  # decoding steps write into room allocated ahead (packed.py)
                if type(layer).__name__ == "DynamicLayer":
                    layer.__class__ = slack
            self.rows, self.cache, self.mask, self.last, self.pos = list(reqs), cache, mask, first, pos
            self.padded = bool((mask == 0).any())
            return
        width = max(self.width, int(mask.shape[1]))
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([left_pad(mine.keys, width, 2), left_pad(theirs.keys, width, 2)], 0)
            mine.values = torch.cat([left_pad(mine.values, width, 2), left_pad(theirs.values, width, 2)], 0)
        self.mask = torch.cat([left_pad(self.mask, width, 1), left_pad(mask, width, 1)], 0)
        self.rows += reqs
        self.padded = bool((self.mask == 0).any())
        self.last = torch.cat([self.last, first])
        self.pos = torch.cat([self.pos, pos])

    def drop(self, gone: set[int]) -> None:
        """Rows that left; columns every remaining row pads are cut off."""
        import torch

        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        if not keep:
            self.__init__()
            return
        self.rows = [self.rows[i] for i in keep]
        index = torch.tensor(keep, device=self.mask.device)
        self.mask, self.last, self.pos = self.mask[index], self.last[index], self.pos[index]
        lead = int(self.mask.argmax(1).min())  # leading columns padded in every row
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, lead:], layer.values[index, :, lead:]
        self.mask = self.mask[:, lead:]
        self.padded = bool((self.mask == 0).any())


def left_pad(t: Any, width: int, dim: int) -> Any:
    """`t` padded with zeros on the left of dimension `dim` up to `width`."""
    import torch

    short = width - t.shape[dim]
    if short <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = short
    return torch.cat([t.new_zeros(shape), t], dim)


class EngineStream:
    """One streamed request: the router thread posts the tokens so far onto this loop's queue (only the
    newest list matters: each holds all tokens so far); iterating decodes them into text pieces."""

    def __init__(self, engine: ContinuousEngine, loop: Any, ids: list[int], max_new_tokens: int,
                 max_length: int | None, deadline: float | None, opts: dict | None = None):
        import asyncio

        self.engine, self.deadline = engine, deadline
        self.queue: asyncio.Queue = asyncio.Queue()
        post = lambda item: loop.call_soon_threadsafe(self.queue.put_nowait, item)  # noqa: E731
        self.req = engine.submit(ids, max_new_tokens, on_tokens=post, max_length=max_length, **(opts or {}))
        self.req.future.add_done_callback(lambda f: post(None))
        self.pieces = TextPieces(engine.local.tok, engine.stops, self.req.stop, self.req.strip)
        self.tokens: list[int] = []  # the newest token list the pieces so far were decoded from
        self.lp_sent = 0

    def new_logprobs(self) -> list:
        """The per-token log-probabilities of tokens whose text the pieces so far hold whole, not yet
        sent (not of every token decoded: text held back at a stop string may never be sent)."""
        got = self.req.lps[self.lp_sent:self.pieces.cover(self.tokens)]
        self.lp_sent += len(got)
        return got

    async def __aiter__(self):
        import asyncio

        try:
            while True:
                left = None if self.deadline is None else self.deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError
                item = await asyncio.wait_for(self.queue.get(), timeout=left)
                if item is None:  # finished (or failed: result() raises)
                    done = self.req.future.result()
                    rest = self.pieces.finish(done)
                    if rest:
                        yield rest
                    yield done
                    return
                while not self.queue.empty():  # several token lists waiting: the newest has them all
                    newer = self.queue.get_nowait()
                    if newer is None:
                        self.queue.put_nowait(None)
                        break
                    item = newer
                self.tokens = item
                piece = self.pieces.feed(item)
                if piece:
                    yield piece
        finally:  # timed out, failed, or the client went away: stop generating for it
            if not self.req.future.done():
                self.engine.cancel(self.req)
