"""`medpipe serve RUN_DIR [--stage S] [--rag]`: an OpenAI-compatible HTTP server for a stage's model.

FastAPI app served by uvicorn on 127.0.0.1 (default port 8000):
* `GET /v1/models`, `GET /v1/models/{id}` → the model object(s).
* `POST /v1/chat/completions` (`messages` with roles system, developer (= system), user, assistant;
  text content parts) and `POST /v1/completions` (`prompt`: a string, strings, or token ids; `echo`;
  `logprobs` k in the legacy layout; `max_tokens` 0 scores the prompt only), both with `max_tokens`
  (or `max_completion_tokens`), `temperature` (0 = greedy, the default), `top_p`, `seed`, `stop` (a
  string or a list: the text ends before it, finish_reason "stop"), chat's `logprobs`/`top_logprobs`,
  `stream` (server-sent events: chunks as decoded, then `[DONE]`; an error after the stream began is a
  `data: {"error": ...}` event) and `stream_options.include_usage` (a last chunk with `choices: []`
  and the usage). Shapes: medpipe.commands.serve_openai; checks: medpipe.commands.serve_requests.
  Parameters it does not honour (response_format, tools, logit_bias, penalties, image parts, role
  tool, n > 1, ...) are refused with 400 naming them, never silently ignored.
* `GET /health` → `{"status": "ok"}` (no API key needed).

Limits (`Limits`): a body over `max_body_bytes` → 413; a prompt longer than the model's context
minus max_tokens → 400 naming the max_tokens sent (or, with `truncate="left"`, its oldest tokens
dropped); a request not answered within `timeout` s → 503, as is one arriving to a full queue. With
an API key (`--api-key` or $MEDPIPE_API_KEY), /v1/* needs `Authorization: Bearer KEY` (401). Every
error has OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 a request that
cannot be served (not JSON, a value of the wrong type or out of range, prompt too long), 401, 404
unknown model or path, 413, 503. A client that goes away (a stream closed, a plain request
abandoned) stops its generation at the next step, greedy or sampled.

Batching (`Limits.batching`): "continuous" (the default) runs greedy requests, streamed or not,
through `ContinuousEngine` (medpipe.stages.inference.continuous): a request joins the running batch
at the next decoding step and leaves it when done, a stream gets its tokens as the shared batch
produces them. Models it cannot serve, or that answer its start-up probe differently from
sequential generation, fall back to "static" (medpipe.commands.serve_batcher): requests wait in one
queue; a worker thread takes every request waiting when the model frees up and generates them as one
batch per setting through `LocalModel.generate_ids`. Sampled requests (temperature > 0) run alone
either way, so a seed gives the same text as it does sequentially (their streams through
`LocalModel.stream`).
With `--rag` the last user message gets the top-k passages of the run's knowledge index
(the first cpt stage's corpus, or `--rag-corpus`) prepended, as in `medpipe chat --rag`.
`--engine vllm` starts vLLM's own OpenAI server on the stage's merged model instead.
"""
import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from medpipe.commands.serve_batcher import Batcher
from medpipe.commands.serve_requests import ApiError, fit_to_context, model_context, parse_completion, parse_request

API_KEY_ENV = "MEDPIPE_API_KEY"
INLINE_PREPARE_CHARS = 4096  # longer conversations are rendered and tokenised in a worker thread


@dataclass
class Limits:
    max_body_bytes: int = 2 << 20
    timeout: float = 120.0  # seconds from arrival to answer (queue wait included)
    truncate: str = "none"  # none: refuse a too-long prompt (400); left: drop its oldest tokens
    context: int | None = None  # default: the model's max_position_embeddings
    max_batch: int = 32
    max_queue: int = 256
    api_key: str | None = None
    batching: str = "continuous"  # continuous: requests join the running batch; static: micro-batches
    kv_cache_mb: int = 1024  # the continuous batcher's paged KV cache (at least one full-context request)


# --- the app --------------------------------------------------------------------------------------
def build_app(model: Any, model_id: str, retriever: Any = None, default_max_tokens: int = 256,
              limits: Limits | None = None):
    import asyncio
    import hmac

    import anyio
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    from medpipe.commands.chat import augment

    from medpipe.commands.serve_openai import chat_response, completions_response, sse, static_stream, wait_or_gone
    from medpipe.stages.inference.continuous import GenerationFailed

    limits = limits or Limits()
    context = limits.context or model_context(model)
    encode = getattr(model, "encode", None)
    tok = getattr(model, "tok", None)
    # a completions prompt is raw text: the tokenizer's own special tokens (BOS where it adds one)
    encode_raw = (lambda text: model.encode(text, add_special_tokens=True)) if encode is not None else None
    vocab = len(tok) if tok is not None else None
    batcher = Batcher(model, limits.max_batch, limits.max_queue)
    engine, app_batching = start_engine(model, limits, context, encode)
    app = FastAPI(title="medpipe", version="1")
    app.state.batcher, app.state.engine, app.state.batching = batcher, engine, app_batching
    created = int(time.time())

    def reply(e: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(status_code=e.status, content=e.body(), headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):  # unknown paths (404), wrong methods (405)
        return reply(ApiError(exc.status_code, str(exc.detail), "not_found" if exc.status_code == 404 else "http_error"))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return reply(ApiError(400, str(exc), "invalid_value"))

    @app.exception_handler(Exception)
    async def server_error(request, exc):
        return reply(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error"))

    def authorise(request: Request) -> None:
        if not limits.api_key:
            return
        given = request.headers.get("authorization", "")
        token = given[7:].strip() if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), limits.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)", "invalid_api_key")

    async def read_body(request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise ApiError(413, f"the body is {int(declared):,} bytes; this server takes at most "
                                f"{limits.max_body_bytes:,}", "request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise ApiError(413, f"the body is over {limits.max_body_bytes:,} bytes, the most this server takes",
                               "request_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, RecursionError):
            raise ApiError(400, "the body is not JSON", "invalid_json") from None

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    listed = {"id": model_id, "object": "model", "created": created, "owned_by": "medpipe"}

    @app.get("/v1/models")
    def models(request: Request):
        try:
            authorise(request)
        except ApiError as e:
            return reply(e)
        return {"object": "list", "data": [listed]}

    @app.get("/v1/models/{name:path}")
    def model_object(name: str, request: Request):
        try:
            authorise(request)
            if name != model_id:
                raise ApiError(404, f"the model '{name}' does not exist; this server serves '{model_id}'",
                               "model_not_found", "model")
        except ApiError as e:
            return reply(e)
        return listed

    def fit(prompt: Any, req: dict) -> tuple:
        """(prompt, max_tokens, max_length, ids) within the context (ApiError when it cannot fit)."""
        return (prompt, *fit_to_context(prompt, encode_raw if req["kind"] == "completion" else encode, context,
                                        req["max_tokens"], default_max_tokens, limits.truncate, req["max_tokens_param"]))

    async def prepared(request: Request, kind: str) -> tuple[dict, list[tuple]]:
        """The checked request and its prompts fitted to the context (rendered, tokenised)."""
        authorise(request)
        body = await read_body(request)
        if kind == "chat":
            req = parse_request(body, model_id)
            messages = req["messages"]
            if retriever is not None:
                last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
                if last is not None:
                    messages[last] = {"role": "user", "content": augment(messages[last]["content"], retriever)}
            prompts: list = [None]
            size = sum(len(m["content"]) for m in messages)
        else:
            req = parse_completion(body, model_id, vocab)
            if encode is None and any(not isinstance(p, str) for p in req["prompts"]):
                raise ApiError(400, "token-id prompts need the model's tokenizer", "unsupported_value", "prompt")
            prompts, size = req["prompts"], sum(len(p) for p in req["prompts"])
        req["kind"] = kind

        def prepare() -> list[tuple]:  # template + tokenising: off the event loop when long
            if kind == "chat":
                return [fit(model.render(req["messages"]), req)]
            return [fit(p, req) for p in prompts]

        # a short request is rendered and tokenised right here (well under a millisecond): the hop to a
        # worker thread and back cost more than that under load; a long one goes off the loop
        return req, (prepare() if size <= INLINE_PREPARE_CHARS else await anyio.to_thread.run_sync(prepare))

    async def answer(request: Request, kind: str):
        arrived = time.monotonic()
        batcher.arriving(1)
        try:
            req, items = await prepared(request, kind)
        except ApiError as e:
            return reply(e)
        finally:
            batcher.arriving(-1)
        opts = {"stop": req["stop"], "logprobs": req["logprobs"], "echo": req["echo"], "strip": kind == "chat"}
        cid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        now = int(time.time())
        deadline = arrived + limits.timeout
        timed_out = ApiError(503, f"the request was not answered within {limits.timeout:g} s", "timeout")
        sampled = req["temperature"] > 0
        continuous = engine is not None and all(ids is not None for *_, ids in items) and not sampled
        base = {"id": cid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                "created": now, "model": model_id}
        texts = [prompt_text(p, ids) for p, _, _, ids in items]
        try:
            if continuous and engine.in_flight + len(items) > limits.max_queue + limits.max_batch:
                raise ApiError(503, f"the server is busy ({engine.in_flight} requests in flight); retry later",
                               "server_busy")
            if req["stream"]:
                prompt, max_tokens, max_length, ids = items[0]
                if continuous:
                    pieces = engine.stream(ids, max_tokens, max_length, deadline, **opts)
                    lps = pieces.new_logprobs
                else:
                    gen = dict(max_new_tokens=max_tokens, temperature=req["temperature"], top_p=req["top_p"],
                               seed=req["seed"], max_length=max_length)
                    pieces, lps = static_stream(model, ids if ids is not None else prompt, gen, opts, deadline), None
                return StreamingResponse(sse(kind, tok, base, pieces, timed_out, req, lps, texts[0], ids),
                                         media_type="text/event-stream")
            if continuous:
                works = [engine.submit(ids, mt, max_length=ml, **opts) for _, mt, ml, ids in items]
                futures, stop = [w.future for w in works], (lambda: [engine.cancel(w) for w in works])
            else:
                jobs = [batcher.submit(p, dict(max_new_tokens=mt, temperature=req["temperature"], top_p=req["top_p"],
                                                seed=req["seed"], max_length=ml),
                                       limits.timeout - (time.monotonic() - arrived), ids, opts) for p, mt, ml, ids in items]
                futures, stop = [j.future for j in jobs], (lambda: [j.gone.set() for j in jobs])
        except ApiError as e:
            return reply(e)
        except GenerationFailed as e:
            return reply(ApiError(503, f"generation is not available: {e}", "server_error"))
        try:
            cs = await wait_or_gone(request, futures, max(0.001, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            stop()
            return reply(timed_out)
        except asyncio.CancelledError:
            stop()
            raise
        except ApiError as e:
            stop()
            return reply(e)
        except GenerationFailed as e:
            return reply(ApiError(500, f"generation failed: {e}", "internal_error"))
        if cs is None:  # the client went away: its sequences leave the batch at the next step
            stop()
            return reply(ApiError(499, "the client closed the connection", "client_closed"))
        # a JSONResponse, not a dict: FastAPI would walk the dict through jsonable_encoder first
        if kind == "chat":
            return JSONResponse(chat_response(tok, cid, now, model_id, cs[0]))
        return JSONResponse(completions_response(tok, cid, now, model_id, cs, texts, req))

    def prompt_text(prompt: Any, ids: list | None) -> str:
        if isinstance(prompt, str):
            return prompt
        return tok.decode(ids, skip_special_tokens=False) if ids is not None and tok is not None else ""

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, "completion")

    return app


def start_engine(model: Any, limits: Limits, context: int | None, encode: Any) -> tuple[Any, str]:
    """The continuous batcher for this model, or None and why not (then requests are micro-batched)."""
    if limits.batching not in ("continuous", "static"):
        from medpipe.errors import MedpipeError

        raise MedpipeError(f"batching must be continuous or static, got {limits.batching!r}")
    if limits.batching == "static":
        return None, "static"
    from medpipe.stages.inference.continuous import ContinuousEngine, unsupported

    why = unsupported(model) or (None if encode is not None and context else "the model has no tokenizer context")
    engine = None
    if why is None:
        engine = ContinuousEngine(model, limits.max_batch, context, limits.kv_cache_mb)
        # the probe: a short and a longer chat prompt must answer as sequential generation does
        probes = [encode(model.render([{"role": "user", "content": q}])) for q in ("Hi", "头痛发热咳嗽胸闷 " * 8)]
        why = engine.check(probes)
        if why is not None:
            engine.close()
            engine = None
    return engine, "continuous" if engine is not None else f"static ({why})"


# --- running it -----------------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def make_server(app: Any, host: str, port: int, log_level: str = "info"):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                         timeout_graceful_shutdown=2))


@contextlib.contextmanager
def serving(app: Any, host: str = "127.0.0.1", port: int | None = None, timeout: float = 30.0):
    """Run the app in a background thread for the duration of the block; yields its base URL."""
    port = port or free_port(host)
    server = make_server(app, host, port, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"server on {host}:{port} did not start")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        close_engine(app)


def close_engine(app: Any) -> None:
    engine = getattr(getattr(app, "state", None), "engine", None)
    if engine is not None:
        engine.close()


def vllm_command(model_path: str, name: str, host: str, port: int, api_key: str | None,
                 trust_remote_code: bool) -> list[str]:
    import sys

    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
           "--served-model-name", name, "--host", host, "--port", str(port)]
    if trust_remote_code:
        cmd.append("--trust-remote-code")
    if api_key:
        cmd += ["--api-key", api_key]
    return cmd


def serve_vllm(art: Any, name: str, host: str, port: int, api_key: str | None, say=print) -> int:
    """vLLM's own OpenAI server on the stage's merged model (production throughput)."""
    import importlib.util
    import subprocess

    from medpipe.errors import MedpipeError

    if importlib.util.find_spec("vllm") is None:
        raise MedpipeError("--engine vllm: vLLM is not installed here (pip install vllm, on a CUDA machine); "
                           "the default --engine transformers serves without it")
    cmd = vllm_command(art.model_path, name, host, port, api_key, art.trust_remote_code)
    shown = [("***" if i and cmd[i - 1] == "--api-key" else a) for i, a in enumerate(cmd)]
    say("$ " + " ".join(shown))
    return subprocess.call(cmd)


def serve(run_dir: str, stage: str | None = None, host: str = "127.0.0.1", port: int = 8000, rag: bool = False,
          rag_corpus: str | None = None, stop_after: float | None = None, say=print, engine: str = "transformers",
          limits: Limits | None = None, exit_on_signal: bool = False) -> int:
    """Load the stage's model and serve it until interrupted (or `stop_after` seconds); with
    `exit_on_signal` (the CLI) an interrupt ends the process right after the server finished."""
    from medpipe.commands.rundir import stage_artifact
    from medpipe.errors import MedpipeError

    limits = limits or Limits()
    limits.api_key = limits.api_key or os.environ.get(API_KEY_ENV) or None
    if limits.truncate not in ("none", "left"):
        raise MedpipeError(f"--truncate must be none or left, got {limits.truncate!r}")
    if limits.batching not in ("continuous", "static"):
        raise MedpipeError(f"--batching must be continuous or static, got {limits.batching!r}")
    name, art = stage_artifact(run_dir, stage)
    if engine == "vllm":
        if rag:
            raise MedpipeError("--rag is served by --engine transformers only")
        return serve_vllm(art, name, host, port, limits.api_key, say)
    if engine != "transformers":
        raise MedpipeError(f"--engine must be transformers or vllm, got {engine!r}")
    from medpipe.commands.chat import rag_retriever
    from medpipe.stages.inference.runtime import LocalModel

    model = LocalModel.from_artifact(art, name=name)
    retriever = rag_retriever(run_dir, rag_corpus, say=say) if rag else None
    app = build_app(model, name, retriever, limits=limits)
    server = make_server(app, host, port)
    if stop_after:
        timer = threading.Timer(stop_after, lambda: setattr(server, "should_exit", True))
        timer.daemon = True
        timer.start()
    batching = getattr(getattr(app, "state", None), "batching", limits.batching)
    say(f"serving {name} ({art.model_path}){' + RAG' if retriever else ''} at http://{host}:{port}/v1 "
        f"(OpenAI-compatible: /v1/models, /v1/chat/completions, /v1/completions){'; API key required' if limits.api_key else ''}; "
        f"Ctrl-C stops; {batching} batching")
    try:
        server.run()  # on SIGINT/SIGTERM uvicorn shuts down, then raises the signal again (KeyboardInterrupt)
    except KeyboardInterrupt:
        close_engine(app)
        if exit_on_signal:
            # the interpreter's own teardown (threads, the model's tensors) took seconds after "Finished
            # server process": nothing is left to save, so the process ends here
            import sys

            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        raise
    finally:
        close_engine(app)
    return 0
