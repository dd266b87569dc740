"""The two evaluation backends behind one Protocol (`EvalBackend`): `TransformersBackend`
(default; batched, padding-aware — prompts sorted by length, left padding, `batch_size` at a time)
and `VLLMBackend` (GPU machines with vLLM installed). The evaluation drivers
(medpipe.stages.evaluation.runner) only call the Protocol's methods; `open_backend` picks one.

Both tokenise prompts the same way (`runtime.encode_prompts`: batch encode, cut from the left to
`max_length`); vLLM receives them as token ids (its TokensPrompt shape), so both score the very
same tokens. Next-token scores: transformers returns the candidates' logits at the prompt's last
position (prefix-shared for k-shot prompts, medpipe.stages.inference.prefix); vLLM returns each
candidate's log-probability after the prompt, from the prompt logprobs of prompt + candidate, all
in one batched call (a top-N list may not contain every candidate; vLLM's prefix cache computes
each prompt once). The vLLM path is tested against a stand-in engine (no vLLM on CPU).
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

from .runtime import encode_prompts, pad_id


class EvalBackend(Protocol):
    name: str
    tok: Any
    model: Any  # the torch module (transformers) — option log-likelihoods need it; None for vLLM

    @property
    def has_template(self) -> bool: ...

    def render(self, messages: list[dict]) -> str:
        """The prompt for the next assistant turn (chat template or a plain transcript)."""

    def generate(self, prompts: list[str], max_new_tokens: int, add_special_tokens: bool,
                 num_beams: int = 1) -> list[str]:
        """Greedy (or `num_beams` beam-search) continuations, stripped."""

    def next_token_scores(self, prompts: list[str], candidates: list[list[int]],
                          add_special_tokens: bool) -> list[dict[int, float]]:
        """Per prompt, a score for each of its candidate next-token ids (higher = likelier)."""


def token_logits(model: Any, enc: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]], batch_size: int,
                 pad: int, share_prefix: bool = True) -> list[dict[int, float]]:
    """Logits of each prompt's candidate token ids at its last position (one copy of the
    candidate columns per batch, not the whole vocabulary)."""
    from .prefix import last_token_logits

    cols = sorted({t for c in candidates for t in c})
    col = {t: j for j, t in enumerate(cols)}
    out: list[dict | None] = [None] * len(enc)
    for rows, logits in last_token_logits(model, enc, batch_size, pad, share_prefix):
        sub = logits[:, cols].tolist()
        for r, k in enumerate(rows):
            out[k] = {t: sub[r][col[t]] for t in candidates[k]}
    return out  # type: ignore[return-value]


class TransformersBackend:
    name = "transformers"

    def __init__(self, local: Any, batch_size: int = 16, max_length: int | None = None):
        self.local = local  # runtime.LocalModel
        self.tok = local.tok
        self.model = local.model
        self.batch_size = batch_size
        self.max_length = max_length

    @property
    def has_template(self) -> bool:
        return self.local.has_template

    def render(self, messages: list[dict]) -> str:
        return self.local.render(messages)

    def generate(self, prompts: list[str], max_new_tokens: int, add_special_tokens: bool,
                 num_beams: int = 1) -> list[str]:
        return [c.text for c in self.local.generate(prompts, max_new_tokens=max_new_tokens, batch_size=self.batch_size,
                                                     max_length=self.max_length, add_special_tokens=add_special_tokens,
                                                     num_beams=num_beams)]

    def next_token_scores(self, prompts: list[str], candidates: list[list[int]],
                          add_special_tokens: bool) -> list[dict[int, float]]:
        enc = encode_prompts(self.tok, prompts, add_special_tokens, self.max_length)
        return token_logits(self.model, enc, candidates, self.batch_size, pad_id(self.tok))


class VLLMBackend:
    name = "vllm"
    model = None

    def __init__(self, model_path: str, tokenizer_path: str | None, trust_remote_code: bool = False,
                 max_length: int | None = None):
        try:
            from vllm import LLM
        except ImportError:
            from medpipe.errors import ConfigError

            raise ConfigError("eval.backend=vllm but vLLM is not installed (pip install vllm on a GPU machine); "
                              "use backend=transformers") from None
        from medpipe.stages.models.loader import load_tokenizer

        self.llm = LLM(model=model_path, tokenizer=tokenizer_path or model_path, trust_remote_code=trust_remote_code)
        self.tok = load_tokenizer(tokenizer_path or model_path, trust_remote_code)
        self.max_length = max_length

    @property
    def has_template(self) -> bool:
        return bool(getattr(self.tok, "chat_template", None))

    def render(self, messages: list[dict]) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _token_prompts(self, prompts: list[str], add_special_tokens: bool) -> list[list[int]]:
        return encode_prompts(self.tok, prompts, add_special_tokens, self.max_length)

    def generate(self, prompts: list[str], max_new_tokens: int, add_special_tokens: bool,
                 num_beams: int = 1) -> list[str]:
        from vllm import SamplingParams

        if num_beams != 1:
            from medpipe.errors import ConfigError

            raise ConfigError("beam search (protocol=cmexam) needs backend=transformers")

        reqs = [{"prompt_token_ids": e} for e in self._token_prompts(prompts, add_special_tokens)]
        outs = self.llm.generate(reqs, SamplingParams(temperature=0.0, max_tokens=max_new_tokens))
        return [o.outputs[0].text.strip() for o in outs]

    def next_token_scores(self, prompts: list[str], candidates: list[list[int]],
                          add_special_tokens: bool) -> list[dict[int, float]]:
        from vllm import SamplingParams

        reqs, keys = [], []
        for k, (ids, cand) in enumerate(zip(self._token_prompts(prompts, add_special_tokens), candidates)):
            for t in cand:  # prompt + candidate: its prompt logprob is the candidate's log-probability
                reqs.append({"prompt_token_ids": ids + [t]})
                keys.append((k, t))
        outs = self.llm.generate(reqs, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))
        out: list[dict[int, float]] = [{} for _ in prompts]
        for (k, t), o in zip(keys, outs):
            out[k][t] = float(o.prompt_logprobs[-1][t].logprob)
        return out


def open_backend(art: Any, backend: str = "transformers", batch_size: int = 16, max_length: int | None = None,
                 model_opts: dict | None = None) -> EvalBackend:
    """The backend for artifact `art`'s model (its kind may load it its own way:
    `LocalModel.from_artifact`)."""
    if backend == "vllm":
        trust = art.trust_remote_code or bool((model_opts or {}).get("trust_remote_code"))
        return VLLMBackend(art.model_path, art.tokenizer_path, trust, max_length)
    from .runtime import LocalModel

    return TransformersBackend(LocalModel.from_artifact(art), batch_size, max_length)
