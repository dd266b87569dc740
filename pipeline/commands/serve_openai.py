"""OpenAI's wire shapes for `medpipe serve`: chat and legacy completion responses, their streamed
chunks (server-sent events, `stream_options.include_usage`'s last usage chunk), log-probabilities in
chat's (`logprobs.content[]`) and the legacy (`tokens`, `token_logprobs`, `top_logprobs`,
`text_offset`) layout, a sampled request's stream from the one-at-a-time path, and waiting for a
result while watching for the client to go away (a gone client's generation is stopped).

Light at import: nothing heavy; the model's tokenizer is passed in."""
from __future__ import annotations

import asyncio
import json
import threading
from typing import Any, AsyncIterator

from medpipe.commands.serve_requests import ApiError


# --- log-probabilities ---------------------------------------------------------------------------
_TEXTS: dict[Any, dict[int, str]] = {}  # per tokenizer: token id → its text (decoding was ~30 µs a token)


def token_texts(tok: Any, ids: list[int]) -> list[str]:
    """Each token's own text (a piece of a multi-byte character shows as U+FFFD); the ones not seen
    before are decoded in one batch and remembered (top-k alternatives repeat from step to step)."""
    known = _TEXTS.setdefault(tok, {})
    new = list(dict.fromkeys(i for i in ids if i not in known))
    if new:
        known.update(zip(new, tok.batch_decode([[i] for i in new], skip_special_tokens=False)))
    return [known[i] for i in ids]


def chat_logprobs(tok: Any, entries: list | None) -> dict | None:
    """chat.completion's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    if entries is None:
        return None
    chosen = token_texts(tok, [e[0] for e in entries])
    alts = token_texts(tok, [i for e in entries for i, _ in e[2]])
    out, j = [], 0
    for text, (_, lp, top) in zip(chosen, entries):
        tops = []
        for _, alt_lp in top:
            tops.append({"token": alts[j], "logprob": alt_lp, "bytes": list(alts[j].encode())})
            j += 1
        out.append({"token": text, "logprob": lp, "bytes": list(text.encode()), "top_logprobs": tops})
    return {"content": out}


def legacy_logprobs(tok: Any, entries: list) -> dict:
    """text_completion's `logprobs` for (id, logprob | None, top) entries (None: the first prompt
    token, which nothing predicts); `text_offset`: where each token's text begins in the text of
    all of them (decoded together: a character split over tokens counts once)."""
    ids = [e[0] for e in entries]
    texts = token_texts(tok, ids)
    alts = token_texts(tok, [i for e in entries if e[2] for i, _ in e[2]])
    tokens, lps, tops, offsets, j, at, split = [], [], [], [], 0, 0, False
    for k, (text, (_, lp, top)) in enumerate(zip(texts, entries)):
        tokens.append(text)
        lps.append(lp)
        # the tokens' own texts add up, until one holds part of a character: then the prefix is decoded
        offsets.append(len(tok.decode(ids[:k], skip_special_tokens=False)) if split else at)
        at += len(text)
        split = split or "\ufffd" in text
        if lp is None:
            tops.append(None)
            continue
        d: dict = {}
        for _, alt_lp in top:
            d.setdefault(alts[j], alt_lp)
            j += 1
        tops.append(d)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def prompt_entries(c: Any) -> list:
    """The echoed prompt's (id, logprob, top) entries: scored ones, or the ids alone (logprob None)."""
    if c.prompt_logprobs is not None:
        return [(c.prompt_ids[0], None, None)] + [e for e in c.prompt_logprobs[1:]]
    return [(i, None, None) for i in (c.prompt_ids or [])]


# --- responses ------------------------------------------------------------------------------------
def usage(cs: list) -> dict:
    p, c = sum(x.prompt_tokens for x in cs), sum(x.completion_tokens for x in cs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def chat_response(tok: Any, cid: str, now: int, model_id: str, c: Any) -> dict:
    return {"id": cid, "object": "chat.completion", "created": now, "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                         "logprobs": chat_logprobs(tok, c.logprobs), "finish_reason": c.finish_reason}],
            "usage": usage([c])}


def completion_choice(tok: Any, index: int, c: Any, prompt_text: str, echo: bool, logprobs: int | None) -> dict:
    text = (prompt_text + c.text) if echo else c.text
    lp = None
    if logprobs is not None:
        lp = legacy_logprobs(tok, (prompt_entries(c) if echo else []) + list(c.logprobs or []))
    return {"index": index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason}


def completions_response(tok: Any, cid: str, now: int, model_id: str, cs: list, prompt_texts: list[str],
                         req: dict) -> dict:
    return {"id": cid, "object": "text_completion", "created": now, "model": model_id,
            "choices": [completion_choice(tok, i, c, t, req["echo"], req["logprobs"])
                        for i, (c, t) in enumerate(zip(cs, prompt_texts))],
            "usage": usage(cs)}


# --- streams --------------------------------------------------------------------------------------
def event(obj: dict) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


def error_event(e: BaseException) -> str:
    if isinstance(e, ApiError):
        err = e
    else:
        from medpipe.stages.inference.continuous import GenerationFailed

        what = str(e) if isinstance(e, GenerationFailed) else f"{type(e).__name__}: {e}"
        err = ApiError(500, f"generation failed: {what}", "internal_error")
    return event(err.body())


async def sse(kind: str, tok: Any, base: dict, pieces: AsyncIterator, timed_out: ApiError, req: dict,
              new_logprobs: Any = None, prompt_text: str = "", prompt_ids: list | None = None):
    """Server-sent events of one streamed request (`kind` chat or completion) from an async iterator
    of text pieces, then the Completion; a failure or timeout is an error event, then [DONE]. With
    `include_usage` every chunk carries `usage: null` and a last chunk `choices: []` the usage."""
    extra = {"usage": None} if req["include_usage"] else {}
    lp_on = req["logprobs"] is not None

    def chunk(text: str | None, entries: list | None, finish: str | None = None) -> str:
        if kind == "chat":
            delta = {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": chat_logprobs(tok, entries) if lp_on else None,
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "",
                      "logprobs": legacy_logprobs(tok, entries or []) if lp_on else None, "finish_reason": finish}
        return event({**base, "choices": [choice], **extra})

    if kind == "chat":
        yield event({**base, "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None,
                                          "finish_reason": None}], **extra})
    elif req["echo"]:
        yield chunk(prompt_text, [(i, None, None) for i in (prompt_ids or [])] if lp_on else None)
    sent = 0
    try:
        async for piece in pieces:
            if isinstance(piece, str):
                got = new_logprobs() if (lp_on and new_logprobs) else []
                sent += len(got)
                yield chunk(piece, got)
                continue
            rest = (piece.logprobs or [])[sent:] if lp_on else None
            yield chunk(None if kind == "chat" else "", rest, piece.finish_reason)
            if req["include_usage"]:
                yield event({**base, "choices": [], "usage": usage([piece])})
    except TimeoutError:
        yield error_event(timed_out)
    except Exception as e:
        yield error_event(e)
    yield "data: [DONE]\n\n"


async def static_stream(model: Any, prompt: Any, gen: dict, opts: dict, deadline: float | None = None):
    """One request streamed from the one-at-a-time path (`model.stream` in a thread): text pieces,
    then the Completion. Text from a stop string on is held back (and ends the generation); the
    generation is stopped at its next step when this iterator is closed early (client gone, timeout)."""
    import time

    from medpipe.stages.inference.runtime import find_stop, held_back

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    gone = threading.Event()
    stops = opts.get("stop") or ()
    kw = {k: v for k, v in gen.items() if not (k == "max_length" and v is None)}
    kw.update(opts)

    def work() -> None:
        try:
            for item in model.stream(prompt, cancel=[gone], **kw):  # noqa: B023
                loop.call_soon_threadsafe(queue.put_nowait, ("item", item))
                if gone.is_set():
                    break
        except BaseException as e:  # re-raised on the loop
            loop.call_soon_threadsafe(queue.put_nowait, ("error", e))
        loop.call_soon_threadsafe(queue.put_nowait, ("end", None))

    threading.Thread(target=work, name="medpipe-stream", daemon=True).start()
    text, sent = "", 0
    try:
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError
            what, item = await asyncio.wait_for(queue.get(), timeout=left)
            if what == "error":
                raise item
            if what == "end":
                return
            if not isinstance(item, str):  # the Completion: what the pieces lack of its text, then it
                if item.text.startswith(text[:sent]) and len(item.text) > sent:
                    yield item.text[sent:]
                yield item
                continue
            text += item
            at = find_stop(text, stops) if stops else -1
            show = at if at >= 0 else len(text) - (held_back(text, stops) if stops else 0)
            if at >= 0:
                gone.set()  # generation ends at its next step; its Completion is cut at the stop
            if show > sent:
                yield text[sent:show]
                sent = show
    finally:
        gone.set()


# --- waiting ------------------------------------------------------------------------------------
async def until_disconnected(request: Any) -> None:
    """Returns when the client has gone away (the body is read already: the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def wait_or_gone(request: Any, futures: list, timeout: float) -> list | None:
    """The futures' results; None when the client went away first (the caller stops their generation).
    Raises asyncio.TimeoutError past `timeout`."""
    waiting = asyncio.ensure_future(asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
    gone = asyncio.ensure_future(until_disconnected(request))
    try:
        done, _ = await asyncio.wait({waiting, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if waiting in done:
        return waiting.result()
    waiting.cancel()
    if gone in done:
        return None
    raise asyncio.TimeoutError
