"""Evaluation protocols named after the harnesses results are compared with. Each reproduces its
harness for multiple-choice sets — prompt text, few-shot formatting, what is scored or generated,
normalisation, answer extraction — and cites the files it follows:

* `native` (default): medpipe's own prompts and `method` (ppl | cue | generate | generate_then_cue),
  stages/evaluation/prompts.py;
* `lm-eval`: lm-evaluation-harness 0.4.13 log-likelihood tasks (medqa_4options, medmcqa, pubmedqa,
  mmlu_<subject>, ceval-valid_<medical subject>, cmmlu_<medical subject>), `acc` and `acc_norm` (lmeval.py);
* `opencompass`: OpenCompass generation configs + their extraction (MedQA, MedMCQA, C-Eval; CMB's
  multiple-select extractor) (opencompass.py);
* `medcare`: the MedCare authors' generate-then-"答案为" letter and exact-match scorer (medcare.py);
* `cmexam`: CMExam's own scorer (letter or option text, exact set; 无答案 wrong) (cmexam.py).
A protocol returns one details row per item: gold, pred (letters or None), and where the harness
decides correctness itself, `correct`; every scored option's score (+ tokens, characters), the
generated text, the prompt hash.
"""
from __future__ import annotations

from typing import Any, Callable

FORMATS = {"lm-eval": ("medqa", "medmcqa", "pubmedqa", "ceval", "mmlu"), "opencompass": ("medqa", "medmcqa", "ceval", "cmb"),
           "medcare": ("cmexam", "medqa", "medmcqa", "ceval"), "cmexam": ("cmexam",)}
# model_diverse_gen_batch.py picks the task line by dataset: MedQA/MedMCQA/MMLU English, the rest Chinese
MEDCARE_ENGLISH = ("medqa", "medmcqa")


# Each harness protocol answers one eval set's items: (set, params, backend, few-shot pool, RAG contexts)
# -> one details row per item. The modules are imported when a set is scored, not with the CLI.
def _lm_eval(s: Any, p: Any, backend: Any, pool: list[dict], rag_ctx: list[str]) -> list[dict]:
    from . import lmeval

    return lmeval.run(s.records, s.fmt, p, backend, pool, rag_ctx)


def _opencompass(s: Any, p: Any, backend: Any, pool: list[dict], rag_ctx: list[str]) -> list[dict]:
    from . import opencompass

    return opencompass.run(s.records, s.fmt, p, backend, pool, rag_ctx)


def _medcare(s: Any, p: Any, backend: Any, pool: list[dict], rag_ctx: list[str]) -> list[dict]:
    lang = "en" if s.fmt in MEDCARE_ENGLISH else "zh"
    return generate_then_cue(s.records, p, backend, rag_ctx=rag_ctx, langs=[lang] * len(s.records))


def _cmexam(s: Any, p: Any, backend: Any, pool: list[dict], rag_ctx: list[str]) -> list[dict]:
    from . import cmexam

    return cmexam.run(s.records, p, backend, rag_ctx)


HARNESSES: dict[str, Callable[..., list[dict]]] = {
    "lm-eval": _lm_eval, "opencompass": _opencompass, "medcare": _medcare, "cmexam": _cmexam}
PROTOCOLS = ("native", *HARNESSES)  # `native`: medpipe's own prompts (runner._native_mcq)


def run_protocol(protocol: str, s: Any, p: Any, backend: Any, pool: list[dict], rag_ctx: list[str]) -> list[dict]:
    from medpipe.errors import ConfigError

    if s.fmt not in FORMATS[protocol]:
        raise ConfigError(f"eval set {s.name}: protocol {protocol} has no task for format '{s.fmt}' "
                          f"(it covers {', '.join(FORMATS[protocol])})")
    try:
        return HARNESSES[protocol](s, p, backend, pool, rag_ctx)
    except ValueError as e:  # an item the harness cannot take (unknown C-Eval subject, ...)
        raise ConfigError(f"eval set {s.name}: {e}") from None


def generate_then_cue(items: list[dict], p: Any, backend: Any, rag_ctx: list[str],
                      langs: list[str] | None = None) -> list[dict]:
    """MedCare's generate-then-cue answering (medcare.py), `correct` by MedCare's exact-match scorer."""
    from ..prompts import item_lang
    from . import medcare

    langs = langs or [item_lang(it, p.lang) for it in items]
    return medcare.run(items, p, backend, langs, rag_ctx)
