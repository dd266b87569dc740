"""Talking to models: a stage's model loaded locally (`LocalModel`), an OpenAI-compatible endpoint
over HTTP (`OpenAIClient`), and `medpipe chat` (interactive or one-shot).

Light at import: torch/transformers/httpx are imported inside the functions that use them.

* `stage_artifact(run_dir, stage)` finds a stage's artifact in a run (default: the last done stage
  that is not an eval) and returns its full-model view (adapters merged once, cached).
* `LocalModel.generate(prompts, ...)` is batched, left-padded, greedy by default (temperature 0),
  sampling with temperature/top_p otherwise; generation stops at the tokenizer's eos or an
  end-of-turn token (<|im_end|>, <|eot_id|>, <|end|>) and reports finish_reason "stop"/"length"
  and token counts, as the OpenAI API does. It is medpipe's one generate loop: chat, serve, the
  eval backends and VoC (`LocalModel.wrap(model, tok)` around an in-memory model, C-Poly task ids
  through `tasks=`) all generate through `generate_ids`.
* `encode_prompts(tok, prompts, ...)`: batch tokenisation + left cut, what every backend scores.
* `OpenAIClient(url).chat(messages)` posts to `<url>/chat/completions`; `url` may be the server
  root, its `/v1`, or the full `/v1/chat/completions`. Connection failures raise
  `EndpointError` (a MedpipeError) naming the URL.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from medpipe.errors import MedpipeError

STOP_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>")


class EndpointError(MedpipeError):
    """An OpenAI-compatible endpoint could not be reached or answered an error."""


# --- a local model ------------------------------------------------------------------------------
@dataclass
class Completion:
    text: str
    finish_reason: str  # stop | length
    prompt_tokens: int
    completion_tokens: int
    # with logprobs asked for: per returned token (token id, log-probability, [(id, logprob)] top-k),
    # from the forward that chose it; prompt_logprobs (echo): the same per prompt token, None first
    logprobs: list | None = None
    prompt_logprobs: list | None = None
    prompt_ids: list | None = None


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Where the first of the stop strings begins in text (-1: none does)."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else -1


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of text could begin a stop string (not to be shown yet)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def visible_text(tok: Any, toks: Sequence[int], stops: Sequence[str], strip: bool) -> tuple[str, int | None]:
    """(the text of generated tokens as returned, the number of tokens it covers when a stop string
    cut it, else None): chat text is stripped, completions text is raw; generation ends at a stop string,
    which is not returned."""
    text = tok.decode(list(toks), skip_special_tokens=True)
    text = text.lstrip() if strip else text
    cut = find_stop(text, stops) if stops else -1
    if cut < 0:
        return (text.rstrip() if strip else text), None
    text = text[:cut]
    n = len(toks)
    for k in range(1, len(toks) + 1):  # the fewest tokens whose text reaches the cut
        t = tok.decode(list(toks[:k]), skip_special_tokens=True)
        if len(t.lstrip() if strip else t) >= cut:
            n = k
            break
    return (text.rstrip() if strip else text), n


def top_logprobs(logits: Any, chosen: Any, k: int) -> list[tuple[int, float, list]]:
    """Per row: (chosen id, its log-probability, the top-k [(id, logprob)]) from one step's logits
    (rows × vocab): the distribution of the forward that chose the token (raw logits, before any
    temperature or top_p)."""
    import torch

    lp = torch.log_softmax(logits.float(), -1)
    mine = lp.gather(-1, chosen.view(-1, 1))[:, 0].tolist()
    if k > 0:
        vals, idx = lp.topk(k, -1)
        tops = [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
    else:
        tops = [[] for _ in mine]
    return [(int(c), m, t) for c, m, t in zip(chosen.view(-1).tolist(), mine, tops)]


def encode_prompts(tok: Any, prompts: Sequence[str], add_special_tokens: bool, max_length: int | None) -> list[list[int]]:
    """Token ids of every prompt, cut from the left to max_length: what both eval backends score.
    One batch call: the fast tokenizer encodes the list in parallel (per-prompt calls cost ~10 %)."""
    enc = tok(list(prompts), add_special_tokens=add_special_tokens)["input_ids"] if prompts else []
    return [list(e)[-max_length:] if max_length else list(e) for e in enc]


def pad_id(tok: Any) -> int:
    """The padding id: the tokenizer's pad token, else its eos (left padding is masked anyway)."""
    pid = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pid is None:
        raise ValueError("tokenizer has neither a pad nor an eos token")
    return int(pid)


def left_padded_batches(enc: Sequence[Sequence[int]], batch_size: int, pad: int):
    """Yield (indices, input_ids, attention_mask) batches of token lists, longest first (less
    padding), left-padded so every row's last position is its last real token (generation and
    next-token scoring both read that position)."""
    import torch

    order = sorted(range(len(enc)), key=lambda k: -len(enc[k]))
    step = max(1, batch_size)
    for b0 in range(0, len(order), step):
        chunk = order[b0:b0 + step]
        width = max(len(enc[k]) for k in chunk)
        # padded rows built as lists, one tensor per batch (not one small tensor per row)
        ids = torch.tensor([[pad] * (width - len(enc[k])) + list(enc[k]) for k in chunk], dtype=torch.long)
        attn = torch.tensor([[0] * (width - len(enc[k])) + [1] * len(enc[k]) for k in chunk], dtype=torch.long)
        yield chunk, ids, attn


class LocalModel:
    """A causal LM + tokenizer for chat, serving and evaluation (transformers backend)."""

    def __init__(self, model_path: str, tokenizer_path: str | None = None, trust_remote_code: bool = False,
                 dtype: str = "auto", name: str | None = None, model: Any = None, tokenizer: Any = None):
        from medpipe.stages.models import loader

        self.path = str(model_path)
        self.name = name or Path(self.path).name
        self.tok = tok = tokenizer or loader.load_tokenizer(tokenizer_path or model_path, trust_remote_code)
        if model is None:
            model = loader.load_for_inference(self.path, trust_remote_code=trust_remote_code, dtype=dtype)
        self.model = model.eval()
        self.device = next(model.parameters()).device
        vocab = tok.get_vocab()
        eos = tok.eos_token_id
        stops = set(eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []))
        stops |= {vocab[t] for t in STOP_TOKENS if t in vocab}
        self.stop_ids = sorted(stops)
        self.lock = threading.Lock()  # one generate at a time (serving)

    @classmethod
    def wrap(cls, model: Any, tok: Any, name: str = "model") -> "LocalModel":
        """An in-memory model + tokenizer (VoC, tests, benchmarks): nothing is loaded."""
        return cls(name, name=name, model=model, tokenizer=tok)

    @classmethod
    def from_artifact(cls, art: Any, name: str | None = None) -> "LocalModel":
        """A stage's model; its kind may load it its own way (`load_for_inference(art)` hook on the
        stage class, e.g. MedCare's keep-NA ablation keeps the routed experts)."""
        from medpipe import registry

        model = registry.load(art.kind).load_for_inference(art) if art.kind in registry.kinds() else None
        return cls(art.model_path, art.tokenizer_path, trust_remote_code=art.trust_remote_code,
                   name=name or art.stage, model=model)

    @property
    def has_template(self) -> bool:
        return bool(getattr(self.tok, "chat_template", None))

    def render(self, messages: Sequence[dict]) -> str:
        """The prompt for the next assistant turn: the chat template, or a plain
        "System:/User:/Assistant:" transcript for tokenizers without one."""
        msgs = [{"role": m["role"], "content": str(m.get("content") or "")} for m in messages]
        if self.has_template:
            return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        label = {"system": "System", "user": "User", "assistant": "Assistant"}
        return "".join(f"{label.get(m['role'], m['role'])}: {m['content']}\n" for m in msgs) + "Assistant:"

    def encode(self, prompt: str, add_special_tokens: bool | None = None) -> list[int]:
        if add_special_tokens is None:  # a rendered chat template already has its special tokens
            add_special_tokens = not self.has_template
        return list(self.tok(prompt, add_special_tokens=add_special_tokens)["input_ids"])

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, batch_size: int = 8, max_length: int | None = None,
                 add_special_tokens: bool | None = None, seed: int | None = None,
                 ignore_eos: bool = False, tasks: Sequence[Any] | None = None, num_beams: int = 1,
                 **serving: Any) -> list[Completion]:
        """Batched generation (sorted by length, left padding); greedy when temperature == 0.
        `ignore_eos` generates exactly `max_new_tokens` (benchmarks); `serving`: generate_ids' stop,
        logprobs, echo, cancel, strip."""
        enc = [self.encode(p, add_special_tokens) for p in prompts]
        return self.generate_ids(enc, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 batch_size=batch_size, max_length=max_length, seed=seed, ignore_eos=ignore_eos,
                                 tasks=tasks, num_beams=num_beams, **serving)

    def generate_ids(self, enc: Sequence[list[int]], *, max_new_tokens: int = 128, temperature: float = 0.0,
                     top_p: float = 1.0, batch_size: int = 8, max_length: int | None = None,
                     seed: int | None = None, ignore_eos: bool = False, streamer: Any = None,
                     tasks: Sequence[Any] | None = None, num_beams: int = 1, stop: Sequence[str] = (),
                     logprobs: int | None = None, echo: bool = False, cancel: Sequence[Any] | None = None,
                     strip: bool = True) -> list[Completion]:
        """The generate loop. `tasks`: one task per prompt for models that take task ids (C-Poly);
        `num_beams` > 1: beam search instead of greedy (CMExam's inference). Serving: `stop` strings end
        a row (not returned); `logprobs` (top-k count, 0 = the chosen token's only) come from the logits
        of the step that chose each token; `echo` scores the prompt tokens too; `cancel`: per prompt an
        Event (or None) that, once set, ends that row at the next step; `strip=False` returns raw text."""
        import torch

        if max_length is not None:
            enc = [e[-max_length:] for e in enc]
        pad = pad_id(self.tok)
        stops = set(self.stop_ids)
        out: list[Completion | None] = [None] * len(enc)
        with self.lock, torch.no_grad():
            if seed is not None:
                torch.manual_seed(seed)
            for chunk, ids, attn in left_padded_batches(enc, batch_size, pad):
                prompt_lps = self._prompt_logprobs(ids, attn, logprobs or 0) if echo else [None] * len(chunk)
                if max_new_tokens <= 0:  # scoring only (/v1/completions with max_tokens 0)
                    for r, k in enumerate(chunk):
                        out[k] = Completion("", "length", len(enc[k]), 0, [] if logprobs is not None else None,
                                            prompt_lps[r], list(enc[k]))
                    continue
                kw: dict = dict(input_ids=ids.to(self.device), attention_mask=attn.to(self.device),
                                max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=self.stop_ids or None)
                if ignore_eos:
                    kw["min_new_tokens"] = max_new_tokens
                if tasks is not None:
                    kw["task_ids"] = [tasks[k] for k in chunk]
                if streamer is not None:  # one prompt (transformers streams batch size 1 only)
                    kw["streamer"] = streamer
                if temperature and temperature > 0:
                    kw.update(do_sample=True, temperature=float(temperature), top_p=float(top_p))
                else:
                    kw.update(do_sample=False, num_beams=num_beams, temperature=None, top_p=None, top_k=None)
                events = [cancel[k] for k in chunk] if cancel is not None else None
                if stop or events:
                    kw["stopping_criteria"] = [_ServingStop(self.tok, ids.shape[1], list(stop), strip, events)]
                if logprobs is not None:
                    kw.update(output_logits=True, return_dict_in_generate=True)
                res = self.model.generate(**kw)
                seqs = res.sequences if logprobs is not None else res
                gen = seqs[:, ids.shape[1]:]
                steps = (top_logprobs(torch.stack(res.logits, 1).flatten(0, 1), gen.flatten(), logprobs)
                         if logprobs is not None else None)
                gen = gen.tolist()
                for r, k in enumerate(chunk):
                    toks, reason = gen[r], "length"
                    for j, t in enumerate(toks if not ignore_eos else []):
                        if t in stops:
                            toks, reason = toks[:j], "stop"
                            break
                    text, covered = visible_text(self.tok, toks, stop, strip)
                    if covered is not None:
                        toks, reason = toks[:covered], "stop"
                    lps = steps[r * len(gen[r]):r * len(gen[r]) + len(toks)] if steps is not None else None
                    out[k] = Completion(text, reason, len(enc[k]), len(toks), lps, prompt_lps[r], list(enc[k]))
        return out  # type: ignore[return-value]

    def _prompt_logprobs(self, ids: Any, attn: Any, k: int) -> list[list]:
        """Per row of a left-padded batch: None, then each further prompt token's (id, logprob, top-k)
        given the tokens before it (one forward, every position's logits)."""
        logits = self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device),
                            position_ids=(attn.cumsum(1) - 1).clamp(min=0).to(self.device)).logits
        rows = []
        for r in range(ids.shape[0]):
            start = int((attn[r] == 0).sum())
            rows.append([None] + top_logprobs(logits[r, start:-1], ids[r, start + 1:].to(self.device), k))
        return rows

    def chat(self, messages: Sequence[dict], **kw: Any) -> Completion:
        return self.generate([self.render(messages)], **kw)[0]

    def stream(self, prompt: str | list, **kw: Any) -> Iterator[str | Completion]:
        """Generate for one prompt, yielding the text as it is decoded (str pieces, joined they
        are the completion's text), then the Completion itself (finish reason, token counts).
        Keyword arguments as for generate()."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True, timeout=None)
        result: dict = {}
        strip = kw.get("strip", True)
        ids = list(prompt) if isinstance(prompt, list) else self.encode(prompt)  # token ids: /v1/completions

        def work() -> None:
            try:
                result["done"] = self.generate_ids([ids], streamer=streamer, **kw)[0]
            except BaseException as e:  # re-raised in the caller's thread
                result["error"] = e
                streamer.end()

        worker = threading.Thread(target=work, name="medpipe-stream", daemon=True)
        worker.start()
        sent, pending = "", ""
        for piece in streamer:
            # generate() strips the text: leading whitespace is dropped, trailing whitespace is held
            # back until more text follows, so the pieces join to exactly the completion's text
            text = pending + (piece if sent or not strip else piece.lstrip())
            body = text.rstrip() if strip else text
            pending = text[len(body):]
            if body:
                sent += body
                yield body
        worker.join()
        if "error" in result:
            raise result["error"]
        done: Completion = result["done"]
        if done.text.startswith(sent) and len(done.text) > len(sent):  # trailing text the streamer held back
            yield done.text[len(sent):]
        yield done


def _serving_stop_class():
    from transformers import StoppingCriteria

    class ServingStop(StoppingCriteria):
        """Ends a row of `generate` once its text holds a stop string, or its client went away."""

        def __init__(self, tok: Any, prompt_len: int, stop: list[str], strip: bool, events: list | None):
            self.tok, self.prompt_len, self.stop, self.strip, self.events = tok, prompt_len, stop, strip, events

        def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> Any:
            import torch

            done = []
            for r, row in enumerate(input_ids[:, self.prompt_len:].tolist()):
                gone = bool(self.events and self.events[r] is not None and self.events[r].is_set())
                if not gone and self.stop:
                    text = self.tok.decode(row, skip_special_tokens=True)
                    gone = find_stop(text.lstrip() if self.strip else text, self.stop) >= 0
                done.append(gone)
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return ServingStop


def _ServingStop(*a: Any) -> Any:  # noqa: N802 - built on first use: transformers is imported lazily
    global _SERVING_STOP
    if _SERVING_STOP is None:
        _SERVING_STOP = _serving_stop_class()
    return _SERVING_STOP(*a)


_SERVING_STOP = None


# --- an OpenAI-compatible endpoint --------------------------------------------------------------
def endpoint_base(url: str) -> str:
    """`http://h:p`, `http://h:p/v1` or `.../v1/chat/completions` → `http://h:p/v1`."""
    u = url.rstrip("/")
    if u.endswith("/chat/completions"):
        u = u[: -len("/chat/completions")]
    if not u.endswith("/v1"):
        u += "/v1"
    return u


class OpenAIClient:
    """Minimal client for `/v1/models` and `/v1/chat/completions` (httpx)."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, timeout: float = 60.0):
        self.base = endpoint_base(url)
        self.model = model
        self.api_key = api_key
        self.timeout = timeout

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _request(self, method: str, path: str, **kw: Any) -> dict:
        import httpx

        url = self.base + path
        try:
            r = httpx.request(method, url, headers=self._headers(), timeout=self.timeout, **kw)
        except httpx.TransportError as e:
            raise EndpointError(f"endpoint {url} is unreachable ({type(e).__name__}: {e})") from None
        if r.status_code >= 400:
            raise EndpointError(f"endpoint {url} answered HTTP {r.status_code}: {r.text[:200]}")
        try:
            return r.json()
        except ValueError:
            raise EndpointError(f"endpoint {url} did not answer JSON: {r.text[:200]}") from None

    def models(self) -> list[str]:
        return [m.get("id") for m in self._request("GET", "/models").get("data", [])]

    def check(self) -> str:
        """Reach the endpoint (GET /models); returns the model name to use."""
        names = self.models()
        if self.model is None:
            if not names:
                raise EndpointError(f"endpoint {self.base} lists no model; set the model name")
            self.model = names[0]
        return self.model

    def chat(self, messages: Sequence[dict], max_tokens: int = 256, temperature: float = 0.0) -> str:
        if self.model is None:
            self.check()
        body = {"model": self.model, "messages": list(messages), "max_tokens": max_tokens, "temperature": temperature}
        data = self._request("POST", "/chat/completions", json=body)
        try:
            return data["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise EndpointError(f"endpoint {self.base} answered an unexpected shape: {str(data)[:200]}") from None


def api_key_from_env(name: Optional[str]) -> Optional[str]:
    return os.environ.get(name) if name else None
