"""`medpipe serve RUN_DIR [--stage S] [--rag]`: an OpenAI-compatible HTTP server for a stage's model.

FastAPI app served by uvicorn on 127.0.0.1 (default port 8000):
* `GET /v1/models` → `{"object": "list", "data": [{"id": <stage>, "object": "model", ...}]}`
* `POST /v1/chat/completions` with `{"model", "messages": [{"role", "content"}], "max_tokens"
  (or "max_completion_tokens"), "temperature" (0 = greedy, the default), "top_p", "seed",
  "stream"}` → `{"id", "object": "chat.completion", "created", "model", "choices": [{"index": 0,
  "message": {"role": "assistant", "content"}, "finish_reason": "stop"|"length"}], "usage"}`.
  `stream: true` is answered as server-sent events (`chat.completion.chunk`s: the role, the
  text piece by piece as it is decoded, the finish reason; then `[DONE]`). `n` > 1 is refused (400).
  Errors use OpenAI's shape `{"error": {"message", "type", "code"}}`.
* `GET /health` → `{"status": "ok"}`.
With `--rag` the last user message gets the top-k passages of the run's knowledge index
(the first cpt stage's corpus, or `--rag-corpus`) prepended, as in `medpipe chat --rag`.
Requests are served one generation at a time (the model is shared; a lock serialises them).
"""
import contextlib
import json
import socket
import threading
import time
import uuid
from typing import Any, Iterator


def build_app(model: Any, model_id: str, retriever: Any = None, default_max_tokens: int = 256):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    from medpipe.commands.chat import augment

    app = FastAPI(title="medpipe", version="1")
    created = int(time.time())

    def error(status: int, message: str, code: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": {"message": message, "type": code, "code": status}})

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "medpipe"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        import anyio

        try:
            body = await request.json()
        except ValueError:
            return error(400, "the body is not JSON")
        if not isinstance(body, dict):
            return error(400, "the body must be a JSON object")
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return error(400, "'messages' must be a non-empty list")
        messages = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                return error(400, f"messages[{i}]: role must be system, user or assistant")
            content = m.get("content")
            if isinstance(content, list):  # content parts: keep the text ones
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
            if not isinstance(content, str):
                return error(400, f"messages[{i}]: content must be a string")
            messages.append({"role": m["role"], "content": content})
        if int(body.get("n") or 1) != 1:
            return error(400, "n > 1 is not supported")
        try:
            max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or default_max_tokens)
            temperature = float(body.get("temperature") or 0.0)
            top_p = float(body.get("top_p") if body.get("top_p") is not None else 1.0)
            seed = body.get("seed")
            seed = int(seed) if seed is not None else None
        except (TypeError, ValueError):
            return error(400, "max_tokens, temperature, top_p and seed must be numbers")
        if max_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
            return error(400, "need max_tokens >= 1, temperature >= 0, 0 < top_p <= 1")
        if retriever is not None:
            last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
            if last is not None:
                messages[last] = {"role": "user", "content": augment(messages[last]["content"], retriever)}
        prompt = model.render(messages)
        gen = dict(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        now = int(time.time())
        if body.get("stream"):
            def events() -> Iterator[str]:  # a sync generator: Starlette iterates it in a worker thread
                base = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_id}

                def chunk(delta: dict, finish: str | None = None) -> str:
                    return "data: " + json.dumps({**base, "choices": [{"index": 0, "delta": delta,
                                                                       "finish_reason": finish}]},
                                                 ensure_ascii=False) + "\n\n"

                yield chunk({"role": "assistant"})
                for piece in model.stream(prompt, **gen):  # text pieces as decoded, then the Completion
                    yield chunk({"content": piece}) if isinstance(piece, str) else chunk({}, piece.finish_reason)
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        c = await anyio.to_thread.run_sync(lambda: model.generate([prompt], **gen)[0])
        usage = {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                 "total_tokens": c.prompt_tokens + c.completion_tokens}
        return {"id": cid, "object": "chat.completion", "created": now, "model": model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": c.finish_reason}], "usage": usage}

    return app


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


def serve(run_dir: str, stage: str | None = None, host: str = "127.0.0.1", port: int = 8000, rag: bool = False,
          rag_corpus: str | None = None, stop_after: float | None = None, say=print) -> None:
    """Load the stage's model and serve it until interrupted (or `stop_after` seconds)."""
    from medpipe.commands.chat import rag_retriever
    from medpipe.commands.rundir import stage_artifact
    from medpipe.stages.inference.runtime import LocalModel

    name, art = stage_artifact(run_dir, stage)
    model = LocalModel.from_artifact(art, name=name)
    retriever = rag_retriever(run_dir, rag_corpus, say=say) if rag else None
    app = build_app(model, name, retriever)
    server = make_server(app, host, port)
    if stop_after:
        timer = threading.Timer(stop_after, lambda: setattr(server, "should_exit", True))
        timer.daemon = True
        timer.start()
    say(f"serving {name} ({art.model_path}){' + RAG' if retriever else ''} at http://{host}:{port}/v1 "
        f"(OpenAI-compatible: /v1/models, /v1/chat/completions); Ctrl-C stops")
    server.run()
