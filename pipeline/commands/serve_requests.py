"""What `medpipe serve` accepts: the request body checked field by field (OpenAI's parameters,
strict types and ranges: `ApiError` with the HTTP status and OpenAI error code), and the prompt
fitted to the model's context (max_tokens capped, a too-long prompt refused or cut from the left)."""
import json
import math
from typing import Any

MAX_CHARS_PER_TOKEN = 128  # no tokenizer's tokens average more: longer prompts are refused untokenised


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    @property
    def type(self) -> str:
        return {401: "authentication_error", 503: "server_error", 500: "server_error"}.get(self.status,
                                                                                          "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(422, f"'{name}' must be a finite number, got {json.dumps(value)[:40]}", "invalid_type", name)
    if value < low or value > high or (low_open and value == low):
        raise ApiError(422, f"'{name}' must be in {'(' if low_open else '['}{low:g}, {high:g}], got {value:g}",
                       "invalid_value", name)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(422, f"'{name}' must be an integer, got {json.dumps(value)[:40]}", "invalid_type", name)
    if not low <= value <= high:
        raise ApiError(422, f"'{name}' must be between {low} and {high}, got {value}", "invalid_value", name)
    return value


def parse_request(body: Any, model_id: str) -> dict:
    """The checked request: messages, generation settings, stream flag. Raises ApiError."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", "invalid_json")
    name = body.get("model")
    if name is not None and not isinstance(name, str):
        raise ApiError(422, "'model' must be a string", "invalid_type", "model")
    if name not in (None, "", model_id):
        raise ApiError(404, f"the model '{name}' does not exist; this server serves '{model_id}'", "model_not_found", "model")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list", "invalid_messages", "messages")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}]: role must be system, user or assistant", "invalid_messages", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
                              and isinstance(p.get("text", ""), str))
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}]: content must be a string", "invalid_messages", "messages")
        messages.append({"role": m["role"], "content": content})
    n = _integer(body, "n", 1, 128)
    if n not in (None, 1):
        raise ApiError(400, "n > 1 is not supported", "unsupported_value", "n")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise ApiError(422, "'stream' must be true or false", "invalid_type", "stream")
    return {"messages": messages, "max_tokens": _integer(body, key, 1, 2**31), "max_tokens_param": key,
            "temperature": _number(body, "temperature", 0.0, 0.0, 2.0),
            "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
            "seed": _integer(body, "seed", 0, 2**63 - 1), "stream": bool(stream)}


def model_context(model: Any) -> int | None:
    config = getattr(getattr(model, "model", None), "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def fit_to_context(prompt: str, encode: Any, context: int | None, max_tokens: int | None, default: int,
                   truncate: str, param: str) -> tuple[int, int | None, list | None]:
    """(max_tokens, max_length for generate, the prompt's token ids or None): max_tokens capped to
    the context; a prompt longer than context − max_tokens refused (ApiError 400) or, with
    truncate="left", cut to fit."""
    if context is None or encode is None:
        return (max_tokens or default), None, None
    max_tokens = min(max_tokens or default, context) if max_tokens else None
    if len(prompt) > context * MAX_CHARS_PER_TOKEN and truncate != "left":
        n = f"over {context * MAX_CHARS_PER_TOKEN:,} characters"
    else:
        ids = encode(prompt)
        tokens = len(ids)
        if max_tokens is None:  # no max_tokens asked for: the default, within what the context leaves
            max_tokens = max(1, min(default, context - tokens))
        if tokens + max_tokens <= context:
            return max_tokens, None, ids
        if truncate == "left":
            if context - max_tokens < 1:
                raise ApiError(400, f"{param}={max_tokens} leaves no room for the prompt in the model's context of "
                                    f"{context} tokens", "context_length_exceeded", param)
            return max_tokens, context - max_tokens, ids
        n = f"{tokens:,} tokens"
    raise ApiError(400, f"the prompt is {n}; with {param}={max_tokens or default} it exceeds the model's context "
                        f"of {context} tokens: shorten the messages or lower {param}", "context_length_exceeded", "messages")
