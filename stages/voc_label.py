"""`voc_label` — pseudo-label unlabeled PubMedQA-style items (PQA-U) with Verification-of-Choice.

The input model (the previous stage's, merged) runs VoC (`medpipe.stages.evaluation.voc.voc_label`) on every
item of `data` that has no answer: (1) plan, one justification per option; (2) execute, which
justification is logically complete and consistent with the context (the item's long answer is
appended to the context); (3) final response "Answer: X", parsed strictly. An unparseable final
response is recorded (`unparseable.jsonl`, counted per reason in the metrics) and the item is left
out of the dataset: never guessed.

Data: mcq sources; PQA-U as published (the Hub's `pqa_unlabeled` parquet: question, context,
long_answer, no final_decision) reads as unlabeled `pubmedqa` records. Items that already have an
answer are skipped (counted) unless `relabel: true`, which labels them with the gold answer hidden
and reports the agreement of VoC with it (`agreement`): a check of the labeller on PQA-L.

Outputs under the stage dir: `dataset.jsonl` (the labelled items as normalised mcq records:
id, question, context, options, answer [letter], explanation = long answer, subject, task,
label_source "voc", _loc of the source item), `unparseable.jsonl` (id, _loc, parse_detail,
final_text), `traces.jsonl` (every item's VoC trace: justifications, verification, final text).

Artifact: the input model passes through unchanged (format, model_path, tokenizer_path), so the
next stage trains on the same model; `dataset_path` (+ `dataset_records`) hands the dataset
on — a `cpoly` stage right after it (or one with `from: <this stage>`) adds those records to its
training data (`input_dataset: auto`).
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class VocLabelParams:
    data: Any = None  # mcq sources to label (PQA-U); items with an answer are skipped unless relabel
    relabel: bool = False  # also label items that have a gold answer (hidden) and report the agreement
    limit: Optional[int] = None  # label at most N items (first N after reading)
    task: Optional[str] = None  # task of the written records (default: the source's, e.g. pubmedqa)
    lang: str = "auto"  # prompt language: auto (per item) | en | zh
    chat: bool = False  # render the VoC prompts through the tokenizer's chat template
    max_new_tokens: int = 128  # plan and verification steps
    final_max_new_tokens: int = 16  # final "Answer: X" step
    batch_size: int = 8  # prompts per generate call
    max_length: Optional[int] = None  # prompt tokens kept (from the left); null = all
    on_error: Optional[str] = None  # fail | skip; default: the recipe's data.on_error


def select_items(records: list[dict], p: VocLabelParams) -> tuple[list[dict], int]:
    """Items to label (gold answers hidden) and how many labeled items were skipped."""
    items, skipped = [], 0
    for r in records:
        if r.get("answer") and not p.relabel:
            skipped += 1
            continue
        items.append(r)
    if p.limit is not None:
        items = items[:p.limit]
    return items, skipped


def missing_long_answer(items: list[dict]) -> list[str]:
    return [str(r.get("_loc", r.get("id"))) for r in items if not (r.get("long_answer") or r.get("explanation"))]


class VocLabelStage:
    """Pseudo-label unlabeled multiple-choice items (PubMedQA PQA-U) with Verification-of-Choice."""

    Params = VocLabelParams
    trains = False

    def check(self, params: VocLabelParams, base: Any, data_opts: dict) -> list[str]:
        from medpipe.stages.training.params import data_options
        from medpipe.data import load_records

        result = load_records(params.data, "mcq", **data_options(params, data_opts))
        items, skipped = select_items(result.records, params)
        validate(params, items, skipped)
        return result.summary_table().splitlines() + [f"{len(items)} item(s) to label, {skipped} labeled skipped"]

    def run(self, ctx: Any):
        from medpipe.artifact import write_text_atomic
        from medpipe.stages.models import loader
        from medpipe.stages.training import common
        from medpipe.stages.training.params import data_options
        from medpipe.data import load_records
        from medpipe.stages.evaluation.voc import voc_label

        p: VocLabelParams = ctx.params
        records = load_records(p.data, "mcq", **data_options(p, ctx.data)).records
        items, skipped = select_items(records, p)
        validate(p, items, skipped)
        gold = {i: list(r.get("answer") or []) for i, r in enumerate(items)}
        hidden = [{**r, "answer": []} for r in items]

        tok = common.load_tokenizer(ctx)
        model = loader.load_for_inference(ctx.input.model_path, trust_remote_code=ctx.input.trust_remote_code,
                                          dtype=ctx.model.get("dtype"))
        ctx.say(f"VoC labelling {len(items)} item(s) with {ctx.input.model_path}"
                + (f" ({skipped} labeled skipped)" if skipped else ""))
        t0 = time.monotonic()
        out = voc_label(hidden, model, tok, keep_unlabeled=True, lang=p.lang, chat=p.chat,
                        max_new_tokens=p.max_new_tokens, final_max_new_tokens=p.final_max_new_tokens,
                        batch_size=p.batch_size, max_length=p.max_length, task_ids=False)
        seconds = time.monotonic() - t0

        labeled, bad, traces = [], [], []
        reasons: Counter = Counter()
        letters: Counter = Counter()
        agree = n_gold = 0
        for i, rec in enumerate(out):
            trace = rec.pop("voc")
            traces.append({"id": rec["id"], "_loc": rec.get("_loc"), **trace})
            if not rec["answer"]:
                reasons[trace["parse_detail"]] += 1
                bad.append({"id": rec["id"], "_loc": rec.get("_loc"), "reason": trace["reason"],
                            "parse_detail": trace["parse_detail"], "final_text": trace["final_text"]})
                continue
            if gold[i]:
                n_gold += 1
                agree += sorted(gold[i]) == rec["answer"]
            letters[rec["answer"][0]] += 1
            if p.task:
                rec["task"] = p.task
            labeled.append(rec)

        dataset = ctx.output_dir / "dataset.jsonl"
        if ctx.is_main:
            for path, rows in ((dataset, labeled), (ctx.output_dir / "unparseable.jsonl", bad),
                               (ctx.output_dir / "traces.jsonl", traces)):
                write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        metrics: dict = {"items": len(items), "labeled": len(labeled), "unparseable": len(bad),
                         "skipped_labeled": skipped, "seconds": round(seconds, 2)}
        metrics.update({f"unparseable_{k}": v for k, v in sorted(reasons.items())})
        metrics.update({f"label_{k}": v for k, v in sorted(letters.items())})
        if n_gold:
            metrics.update(agreement=agree / n_gold, agreement_n=n_gold)
        ctx.say(f"{len(labeled)} labelled, {len(bad)} unparseable"
                + (f" ({', '.join(f'{k} {v}' for k, v in sorted(reasons.items()))})" if bad else "")
                + (f"; agreement with gold {agree}/{n_gold}" if n_gold else "") + f" → {dataset}")
        # the input model passes through (a later stage trains on it); the dataset is handed on
        return dataclasses.replace(ctx.input, stage=ctx.name, kind=ctx.kind, metrics=metrics,
                                   dataset_path=str(dataset), dataset_records=len(labeled),
                                   config_hash="", inputs_hash="", created="")


def validate(p: VocLabelParams, items: list[dict], skipped: int) -> None:
    from medpipe.errors import ConfigError, MedpipeError

    if p.lang not in ("auto", "en", "zh"):
        raise ConfigError(f"voc_label.lang must be auto, en or zh, got '{p.lang}'")
    if p.limit is not None and p.limit < 1:
        raise ConfigError("voc_label.limit must be >= 1 (or null)")
    if not items:
        raise MedpipeError(f"voc_label: nothing to label ({skipped} item(s) already have an answer; "
                           f"relabel: true labels them with the answer hidden)")
    missing = missing_long_answer(items)
    if missing:
        raise MedpipeError(f"voc_label: {len(missing)} item(s) have no long answer to label from, "
                           f"first at {missing[0]}")
