"""Continuous (iteration-level) batching for `medpipe serve`: requests join the running batch at the
next decoding step and leave it when they finish, instead of waiting for a whole batch to end.

Built on transformers' own `ContinuousBatchingManager` (`model.init_continuous_batching`, what
`transformers serve` uses): a paged KV cache, a scheduler thread that mixes new prompts' prefill
with the running sequences' decode steps. Checked on CPU/fp32 (tiny qwen2 and llama, SmolLM2-135M):
its greedy tokens equal `LocalModel.generate`'s, and `ContinuousEngine` re-checks that on a probe
prompt when it starts (`check()`), so a model it would answer differently for is served the static way.

Greedy only: sampled requests keep their seeded, one-at-a-time path (a shared batch would share
the random stream). One router thread reads the manager's output queue and hands every request its
result (non-streamed: a Future of a `Completion`; streamed: the tokens so far, as produced). When the
manager's loop dies (a forward raised), every request in flight is failed with that error and a new
manager is started for the next ones.

Light at import: torch/transformers are imported inside the functions that use them.
"""
from __future__ import annotations

import copy
import itertools
import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from medpipe.errors import MedpipeError

from .runtime import Completion, pad_id


class GenerationFailed(MedpipeError):
    """The batched generation loop failed while this request was in flight."""


@dataclass
class EngineRequest:
    rid: str
    ids: list[int]
    max_new_tokens: int
    on_tokens: Callable[[list[int]], None] | None = None  # streamed: the tokens so far (router thread)
    future: Future = field(default_factory=Future)


def unsupported(local: Any) -> str | None:
    """Why this model cannot be served with continuous batching (None: it can)."""
    model = getattr(local, "model", None)
    if not hasattr(model, "init_continuous_batching") or not hasattr(local, "stop_ids"):
        return "the model is not a transformers PreTrainedModel"
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager", "paged|eager") and "flash" not in str(impl):
        return f"attention implementation {impl!r} has no paged variant"
    return None


def kv_bytes_per_token(config: Any, dtype_size: int) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * dtype_size


class TextPieces:
    """Text of a growing token list, piece by piece, joining to exactly `Completion.text`
    (decode(tokens).strip()): leading whitespace dropped, trailing whitespace and an unfinished
    multi-byte character held back until more text follows."""

    def __init__(self, tok: Any, stop_ids: set[int]):
        self.tok, self.stops, self.sent = tok, stop_ids, ""

    def feed(self, tokens: list[int]) -> str:
        cut = next((j for j, t in enumerate(tokens) if t in self.stops), len(tokens))
        text = self.tok.decode(tokens[:cut], skip_special_tokens=True).lstrip()
        if text.endswith("\ufffd"):
            return ""
        body = text.rstrip()
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
    """Greedy generation for many concurrent requests through one continuously batched model."""

    def __init__(self, local: Any, max_batch: int = 32, context: int = 4096, kv_cache_mb: int = 1024,
                 page_size: int = 32, max_batch_tokens: int = 256):
        self.local = local
        self.max_batch = max(1, max_batch)
        self.stops = set(local.stop_ids)
        model = local.model
        # the cache holds one request of the full context at least, max_batch of 512 tokens if the budget allows
        per_token = kv_bytes_per_token(model.config, model.dtype.itemsize)
        tokens = min(self.max_batch * 512, (kv_cache_mb << 20) // per_token)
        tokens = max(tokens, context + page_size)
        # max_batch_tokens: tokens of one step (decode rows + prefill chunks); a longer prompt is prefilled
        # over several steps. Small is faster on CPU (the step's static tensors and masks scale with it).
        self.cb_args = dict(page_size=page_size, num_blocks=math.ceil(tokens / page_size),
                            max_batch_tokens=max(page_size, max_batch_tokens), max_requests_per_batch=self.max_batch,
                            allow_block_sharing=False,  # every prompt's KV computed as LocalModel does
                            auto_switch_to_flash=False, use_cuda_graph=False)
        self.pending: dict[str, EngineRequest] = {}
        self.lock = threading.Lock()
        self.ids = itertools.count()
        self.steps = 0  # forward passes of the batching loop (tests: shared steps, not one per request)
        self.restarts = 0
        self.closed = False
        self.manager = self._start_manager()
        self.router = threading.Thread(target=self._route, name="medpipe-cb-router", daemon=True)
        self.router.start()

    # --- the manager ------------------------------------------------------------------------------
    def _generation_config(self) -> Any:
        from transformers import GenerationConfig

        model = self.local.model
        gc = copy.deepcopy(model.generation_config) if model.generation_config is not None else GenerationConfig()
        gc.do_sample, gc.num_beams, gc.temperature, gc.top_p, gc.top_k = False, 1, None, None, None
        gc.eos_token_id = sorted(self.stops) or -1
        gc.pad_token_id = pad_id(self.local.tok)
        return gc

    def _start_manager(self) -> Any:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        model = self.local.model
        manager = model.init_continuous_batching(generation_config=self._generation_config(),
                                                 continuous_batching_config=ContinuousBatchingConfig(**self.cb_args))
        if not hasattr(self, "_hook"):
            self._hook = model.register_forward_pre_hook(self._count_step)
        # the manager's thread, started as a daemon: an open manager must not keep the process alive at exit
        # (transformers starts a non-daemon one; this is ContinuousBatchingManager.start() otherwise)
        if hasattr(manager, "_run_generation_loop") and hasattr(manager, "background_thread_status"):
            manager.background_thread_status.clear()
            manager._generation_thread = threading.Thread(target=manager._run_generation_loop,
                                                          name="medpipe-cb-loop", daemon=True)
            manager._generation_thread.start()
        else:
            manager.start()
        return manager

    def _count_step(self, module: Any, args: Any) -> None:
        thread = getattr(self.manager, "_generation_thread", None) if hasattr(self, "manager") else None
        if threading.current_thread() is thread:
            self.steps += 1

    # --- requests ---------------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self.pending)

    def submit(self, ids: list[int], max_new_tokens: int, on_tokens: Callable[[list[int]], None] | None = None,
               max_length: int | None = None) -> EngineRequest:
        if self.closed:
            raise GenerationFailed("the engine is closed")
        ids = list(ids[-max_length:] if max_length else ids)
        req = EngineRequest(f"mp-{next(self.ids)}", ids, int(max_new_tokens), on_tokens)
        with self.lock:  # with the lock: a restart cannot swap the manager between these two lines
            self.pending[req.rid] = req
            accepted = self.manager.add_request(ids, request_id=req.rid, max_new_tokens=req.max_new_tokens,
                                                streaming=on_tokens is not None, eos_token_id=sorted(self.stops) or -1)
            if accepted is None:
                del self.pending[req.rid]
        if accepted is None:
            raise GenerationFailed("the batching loop is not accepting requests")
        return req

    def stream(self, ids: list[int], max_new_tokens: int, max_length: int | None = None,
               deadline: float | None = None) -> "EngineStream":
        """A streamed request, for a caller on an asyncio loop: `async for x in engine.stream(...)`
        yields text pieces as the batch produces tokens, then the Completion."""
        import asyncio

        return EngineStream(self, asyncio.get_running_loop(), ids, max_new_tokens, max_length, deadline)

    def cancel(self, req: EngineRequest) -> None:
        """Stop generating for a request nobody waits for any more (timed out, client gone)."""
        with self.lock:
            if self.pending.pop(req.rid, None) is None:
                return
            manager = self.manager
        manager.cancel_request(req.rid)
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

    def completion(self, req: EngineRequest, tokens: list[int]) -> Completion:
        cut = next((j for j, t in enumerate(tokens) if t in self.stops), None)
        toks = tokens if cut is None else tokens[:cut]
        text = self.local.tok.decode(toks, skip_special_tokens=True).strip()
        return Completion(text, "length" if cut is None else "stop", len(req.ids), len(toks))

    # --- the router -------------------------------------------------------------------------------
    def _route(self) -> None:
        while not self.closed:
            manager = self.manager
            try:
                out = manager.get_result(timeout=0.2)
            except Exception:  # the queue went away with a dead manager
                out = None
            if out is None:
                if not manager.is_running() and not self.closed:
                    self._restart(manager)
                continue
            with self.lock:
                req = self.pending.get(out.request_id)
                if req is not None and (out.error is not None or out.is_finished()):
                    del self.pending[out.request_id]
            if req is None:  # cancelled
                continue
            try:
                if out.error is not None:
                    req.future.set_exception(GenerationFailed(str(out.error)))
                elif out.is_finished():
                    req.future.set_result(self.completion(req, list(out.generated_tokens)))
                elif req.on_tokens is not None:
                    req.on_tokens(list(out.generated_tokens))
            except Exception as e:  # a listener's failure ends its own request only
                with self.lock:
                    self.pending.pop(req.rid, None)
                if not req.future.done():
                    req.future.set_exception(e)

    def _restart(self, dead: Any) -> None:
        """The loop died (a forward raised): fail what is still in flight, start a fresh manager."""
        status = getattr(dead, "background_thread_status", None)
        error = getattr(status, "fatal_error", None)
        started = True
        with self.lock:
            left, self.pending = list(self.pending.values()), {}
            try:
                self.manager = self._start_manager()
                self.restarts += 1
            except Exception:  # could not start again: submits are refused until the next try
                started = False
        if not started:
            time.sleep(1.0)
        for req in left:
            if not req.future.done():
                req.future.set_exception(GenerationFailed(str(error or "the batching loop stopped")))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.manager.stop(block=True, timeout=5)
        except Exception:
            pass
        hook = getattr(self, "_hook", None)
        if hook is not None:
            hook.remove()
        with self.lock:
            left, self.pending = list(self.pending.values()), {}
        for req in left:
            if not req.future.done():
                req.future.set_exception(GenerationFailed("the server is shutting down"))


class EngineStream:
    """One streamed request: the router thread posts the tokens so far onto this loop's queue (only the
    newest list matters: each holds all tokens so far); iterating decodes them into text pieces."""

    def __init__(self, engine: ContinuousEngine, loop: Any, ids: list[int], max_new_tokens: int,
                 max_length: int | None, deadline: float | None):
        import asyncio

        self.engine, self.deadline = engine, deadline
        self.queue: asyncio.Queue = asyncio.Queue()
        post = lambda item: loop.call_soon_threadsafe(self.queue.put_nowait, item)  # noqa: E731
        self.req = engine.submit(ids, max_new_tokens, on_tokens=post, max_length=max_length)
        self.req.future.add_done_callback(lambda f: post(None))
        self.pieces = TextPieces(engine.local.tok, engine.stops)

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
                piece = self.pieces.feed(item)
                if piece:
                    yield piece
        finally:  # timed out, failed, or the client went away: stop generating for it
            if not self.req.future.done():
                self.engine.cancel(self.req)
