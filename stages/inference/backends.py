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


VLLM_HINT = "pip install 'vllm==0.30.0'"  # the last vLLM that resolves beside medpipe's torch/transformers pins
VLLM_GPU_MEMORY = 0.85  # vLLM's own default is 0.9 of the GPU, KV cache included


class VLLMBackend:
    name = "vllm"
    model = None

    def __init__(self, model_path: str, tokenizer_path: str | None, trust_remote_code: bool = False,
                 max_length: int | None = None, gpu_memory_utilization: float = VLLM_GPU_MEMORY,
                 max_model_len: int | None = None):
        try:
            from vllm import LLM
        except ImportError:
            from medpipe.errors import ConfigError

            raise ConfigError(f"eval.backend=vllm but vLLM is not installed ({VLLM_HINT} on a GPU machine); "
                              "use backend=transformers") from None
        import weakref

        from medpipe.stages.models.loader import load_tokenizer

        # explicit memory and context: vLLM's defaults take 90 % of the GPU and size the KV cache for
        # the model's whole context (32k for Qwen1.5), which may not fit beside anything else
        self.llm = LLM(model=model_path, tokenizer=tokenizer_path or model_path, trust_remote_code=trust_remote_code,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len)
        # the engine (its worker process and the GPU memory it holds) is shut down when this backend
        # is dropped, or at close(): the driver's next training stage needs that GPU
        self._finalizer = weakref.finalize(self, shutdown_vllm, self.llm)
        self.tok = load_tokenizer(tokenizer_path or model_path, trust_remote_code)
        self.max_length = max_length

    def close(self) -> None:
        self.llm = None
        self._finalizer()

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


def shutdown_vllm(llm: Any) -> None:
    """Free what a vLLM engine holds: its engine core (a worker process in vLLM v1), its model-
    parallel groups, the cached CUDA blocks. Each step is the one this vLLM version has."""
    import gc
    import sys

    for stop in (getattr(llm, "shutdown", None),
                 getattr(getattr(getattr(llm, "llm_engine", None), "engine_core", None), "shutdown", None)):
        if callable(stop):
            stop()
            break
    parallel = sys.modules.get("vllm.distributed.parallel_state")
    for name in ("destroy_model_parallel", "destroy_distributed_environment"):
        if parallel is not None and callable(getattr(parallel, name, None)):
            getattr(parallel, name)()
    del llm
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def vllm_limits(model_opts: dict | None, max_length: int | None) -> dict:
    """gpu_memory_utilization and max_model_len for vLLM: `model.vllm_gpu_memory_utilization` /
    `model.vllm_max_model_len` when the recipe sets them (`+model.vllm_max_model_len=8192`), else
    0.85 and the eval's prompt limit + 2048 generated tokens (null: the model's own context)."""
    opts = model_opts or {}
    max_model_len = opts.get("vllm_max_model_len") or (max_length + 2048 if max_length else None)
    return {"gpu_memory_utilization": float(opts.get("vllm_gpu_memory_utilization") or VLLM_GPU_MEMORY),
            "max_model_len": int(max_model_len) if max_model_len else None}


def open_backend(art: Any, backend: str = "transformers", batch_size: int = 16, max_length: int | None = None,
                 model_opts: dict | None = None) -> EvalBackend:
    """The backend for artifact `art`'s model (its kind may load it its own way:
    `LocalModel.from_artifact`)."""
    if backend == "vllm":
        trust = art.trust_remote_code or bool((model_opts or {}).get("trust_remote_code"))
        return VLLMBackend(art.model_path, art.tokenizer_path, trust, max_length, **vllm_limits(model_opts, max_length))
    from .runtime import LocalModel

    return TransformersBackend(LocalModel.from_artifact(art), batch_size, max_length)
