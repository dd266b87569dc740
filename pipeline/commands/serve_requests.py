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
        raise ApiError(400, f"'{name}' must be a finite number, got {json.dumps(value)[:40]}", "invalid_type", name)
    if value < low or value > high or (low_open and value == low):
        raise ApiError(400, f"'{name}' must be in {'(' if low_open else '['}{low:g}, {high:g}], got {value:g}",
                       "invalid_value", name)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{name}' must be an integer, got {json.dumps(value)[:40]}", "invalid_type", name)
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' must be between {low} and {high}, got {value}", "invalid_value", name)
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false", "invalid_type", name)
    return bool(value)


MAX_STOPS, MAX_TOP_LOGPROBS = 16, 20
# parameters this server does not honour: refused by name rather than silently ignored (a value that
# changes nothing, e.g. a penalty of 0 or an empty logit_bias, is accepted)
REFUSED = {
    "response_format": lambda v: not (isinstance(v, dict) and v.get("type") == "text"),
    "tools": lambda v: bool(v), "functions": lambda v: bool(v),
    "tool_choice": lambda v: v != "none", "function_call": lambda v: v != "none",
    "logit_bias": lambda v: bool(v),
    "presence_penalty": lambda v: v != 0, "frequency_penalty": lambda v: v != 0, "repetition_penalty": lambda v: v != 1,
    "best_of": lambda v: v != 1, "suffix": lambda v: bool(v), "audio": lambda v: bool(v),
    "prediction": lambda v: bool(v), "guided_json": lambda v: bool(v), "guided_regex": lambda v: bool(v),
    "modalities": lambda v: v != ["text"],
}


def _refuse_unsupported(body: dict) -> None:
    for name, matters in REFUSED.items():
        if body.get(name) is not None and matters(body[name]):
            raise ApiError(400, f"'{name}' is not supported by this server (it would be ignored)",
                           "unsupported_parameter", name)


def _common(body: dict, model_id: str, min_tokens: int) -> dict:
    """The settings chat and completions share: model, max_tokens, sampling, stop, stream."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", "invalid_json")
    name = body.get("model")
    if name is not None and not isinstance(name, str):
        raise ApiError(400, "'model' must be a string", "invalid_type", "model")
    if name not in (None, "", model_id):
        raise ApiError(404, f"the model '{name}' does not exist; this server serves '{model_id}'", "model_not_found", "model")
    _refuse_unsupported(body)
    n = _integer(body, "n", 1, 128)
    if n not in (None, 1):
        raise ApiError(400, "n > 1 is not supported", "unsupported_value", "n")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stops is None:
        stops = []
    if not isinstance(stops, list) or not all(isinstance(x, str) and x for x in stops) or len(stops) > MAX_STOPS:
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOPS} of them",
                       "invalid_value", "stop")
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or not set(options) <= {"include_usage", "continuous_usage_stats"}:
            raise ApiError(400, "'stream_options' takes {\"include_usage\": true|false}", "invalid_value", "stream_options")
        if not stream:
            raise ApiError(400, "'stream_options' is only allowed with stream: true", "invalid_value", "stream_options")
    include_usage = _flag(options or {}, "include_usage")
    return {"max_tokens": _integer(body, key, min_tokens, 2**31), "max_tokens_param": key,
            "temperature": _number(body, "temperature", 0.0, 0.0, 2.0),
            "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
            "seed": _integer(body, "seed", 0, 2**63 - 1), "stream": stream, "include_usage": include_usage,
            "stop": tuple(stops)}


CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def parse_request(body: Any, model_id: str) -> dict:
    """The checked chat request: messages, generation settings, stream flag. Raises ApiError."""
    req = _common(body, model_id, 1)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list", "invalid_messages", "messages")
    messages = []
    for i, m in enumerate(msgs):
        role = m.get("role") if isinstance(m, dict) else None
        if role in ("tool", "function"):
            raise ApiError(400, f"messages[{i}]: role '{role}' is not supported (this server takes no tools)",
                           "unsupported_value", "messages")
        if role not in CHAT_ROLES:
            raise ApiError(400, f"messages[{i}]: role must be system, developer, user or assistant",
                           "invalid_messages", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            for p in content:
                kind = p.get("type") if isinstance(p, dict) else None
                if kind != "text" or not isinstance(p.get("text", ""), str):
                    raise ApiError(400, f"messages[{i}]: content part of type {json.dumps(kind)[:30]} is not supported "
                                        "(this server takes text only)", "unsupported_value", "messages")
            content = "".join(p.get("text", "") for p in content)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}]: content must be a string", "invalid_messages", "messages")
        messages.append({"role": CHAT_ROLES[role], "content": content})
    logprobs = _flag(body, "logprobs")
    top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "invalid_value", "top_logprobs")
    return {**req, "messages": messages, "logprobs": (top or 0) if logprobs else None, "echo": False}


def parse_completion(body: Any, model_id: str, vocab: int | None) -> dict:
    """The checked legacy completions request: prompts (strings or token ids), echo, logprobs (top-k)."""
    req = _common(body, model_id, 0)
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(t, int) for t in p)) for p in prompt):
        prompts = list(prompt)
    else:
        raise ApiError(400, "'prompt' must be a string, a list of strings, or token ids (a list, or a list of lists)",
                       "invalid_value", "prompt")
    for p in prompts:
        if not isinstance(p, str) and any(isinstance(t, bool) or not 0 <= t < (vocab or 2**31) for t in p):
            raise ApiError(400, f"'prompt' has a token id outside the vocabulary (0..{(vocab or 2**31) - 1})",
                           "invalid_value", "prompt")
    if req["stream"] and len(prompts) > 1:
        raise ApiError(400, "stream: true takes one prompt", "unsupported_value", "prompt")
    logprobs = _integer(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    return {**req, "prompts": prompts, "logprobs": logprobs, "echo": _flag(body, "echo")}


def model_context(model: Any) -> int | None:
    config = getattr(getattr(model, "model", None), "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def fit_to_context(prompt: str | list, encode: Any, context: int | None, max_tokens: int | None, default: int,
                   truncate: str, param: str) -> tuple[int, int | None, list | None]:
    """(max_tokens, max_length for generate, the prompt's token ids or None): max_tokens capped to
    the context; a prompt longer than context − max_tokens refused (ApiError 400) or, with
    truncate="left", cut to fit."""
    asked = default if max_tokens is None else max_tokens  # errors name the value the client sent
    if context is None or encode is None:
        return asked, None, None
    max_tokens = min(max_tokens, context) if max_tokens is not None else None
    if len(prompt) > context * MAX_CHARS_PER_TOKEN and truncate != "left":
        n = f"over {context * MAX_CHARS_PER_TOKEN:,} characters"
    else:
        ids = encode(prompt) if isinstance(prompt, str) else list(prompt)
        tokens = len(ids)
        if max_tokens is None:  # no max_tokens asked for: the default, within what the context leaves
            max_tokens = max(1, min(default, context - tokens))
        if tokens + max_tokens <= context:
            return max_tokens, None, ids
        if truncate == "left":
            if context - max_tokens < 1:
                raise ApiError(400, f"{param}={asked} leaves no room for the prompt in the model's context of "
                                    f"{context} tokens", "context_length_exceeded", param)
            return max_tokens, context - max_tokens, ids
        n = f"{tokens:,} tokens"
    raise ApiError(400, f"the prompt is {n}; with {param}={asked} it exceeds the model's context "
                        f"of {context} tokens: shorten the messages or lower {param}", "context_length_exceeded", "messages")
