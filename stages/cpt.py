"""`cpt` — continued pretraining: next-token loss on plain text packed into `block_size` blocks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medpipe.params import param
from medpipe.stages.training.params import TrainParams, data_options
from medpipe.stages.training.sequence import TrainingKind


@dataclass
class CPTParams(TrainParams):
    # Qilin-Med's CPT settings (§4.2); recipes override per paper.
    changed_defaults = {"lr": 2e-4, "epochs": 3.0, "warmup": 0.05, "weight_decay": 0.01}
    block_size: int = param(1024, "tokens per packed training block")
    exclude_data: Any = param(None, "eval sets (mcq sources, e.g. PubMedQA PQA-L) whose passages must not be "
                                    "pretrained on: documents matching an item's context + long answer (exact or "
                                    "near, MinHash Jaccard >= 0.8) are dropped, counted")
    stream: bool = param(False, "corpora that do not fit in memory: documents streamed from the files (file order, "
                                "not shuffled) into Arrow and packed batch by batch; needs no exclude_data, "
                                "dedup: near, heldout or weight")

    def _rules(self):
        return super()._rules() + [("block_size", self.block_size >= 1, ">= 1")]


def drop_eval_overlap(records: list[dict], params: Any, data_opts: dict) -> tuple[list[dict], int]:
    """Documents that overlap an `exclude_data` item's passage (context + long answer) removed.
    Every document is checked against every passage (documents on the eval side of check_overlap,
    so all copies of a leaked abstract go, not just the first)."""
    if not getattr(params, "exclude_data", None):
        return records, 0
    from medpipe.data import check_overlap, load_records

    items = load_records(params.exclude_data, "mcq", **data_options(params, data_opts)).records
    passages = [{"text": "\n".join(x for x in (r.get("context"), r.get("explanation")) if x) or r["question"],
                 "_loc": r["_loc"]} for r in items]
    rep = check_overlap(passages, records)
    hit = {doc for doc, _ in rep.exact} | {doc for doc, _, _ in rep.near}
    return [r for r in records if r["_loc"] not in hit], len(hit)


def _plain_corpus(params: CPTParams, where: str) -> list:
    """The sources of a `stream: true` corpus; refused unless plain: exclusion, near-dedup, held-out
    splits and weights need every document at once."""
    from medpipe.data import parse_spec
    from medpipe.errors import MedpipeError

    srcs = parse_spec(params.data)
    if params.exclude_data or any(s.dedup == "near" or s.heldout > 0 or s.weight is not None for s in srcs):
        raise MedpipeError(f"{where}: needs a plain corpus (no exclude_data, dedup: near, heldout or weight); "
                           f"set stream: false")
    return srcs


def _check_streamed(params: CPTParams, tok: Any, data_opts: dict) -> list[str]:
    """validate for `stream: true`: the same per-record checks in one streaming pass that holds
    no records (a corpus that does not fit in memory validates as it trains); token lengths
    from the first STATS_SAMPLE documents of each source; one full block must come out."""
    from medpipe.data.validate import STATS_SAMPLE, SourceReport, _pct, check_source_result, iter_source, \
        summary_table, token_lengths
    from medpipe.errors import MedpipeError

    on_error = data_options(params, data_opts)["on_error"]
    srcs = _plain_corpus(params, "stream")
    reports, tokens = [], 0
    for src in srcs:
        rep = SourceReport(path=src.path, format=src.format)
        n, sample = 0, []
        for rec in iter_source(src, "text", on_error, rep):
            n += 1
            if len(sample) < STATS_SAMPLE:
                sample.append(rec)
        check_source_result(src, rep, n, "text")
        lens = sorted(token_lengths(sample, tok))
        rep.kept = rep.mixed = n
        rep.token_sample = len(lens)
        rep.token_p50, rep.token_p90, rep.token_p99 = (_pct(lens, q) for q in (50, 90, 99))
        rep.token_max = lens[-1] if lens else 0
        tokens += sum(lens) + len(lens)  # + one EOS a document
        reports.append(rep)
    if tokens < params.block_size and sum(r.kept for r in reports) <= STATS_SAMPLE:
        raise MedpipeError(f"the data gives no full block of block_size={params.block_size} tokens ({tokens} tokens "
                           f"in {sum(r.kept for r in reports)} documents); lower block_size or add text")
    return summary_table(reports).splitlines() + [
        f"streamed: every document checked in one pass, none held in memory; token lengths from the first "
        f"{STATS_SAMPLE:,} documents of each source (max = their max)"]


def _require_a_block(records: list[dict], tok: Any, block_size: int) -> None:
    """`run` would stop with no full block: say so in validate. Exact for small corpora (tokenised);
    a corpus of more documents than a block has tokens always fills one (each adds >= 2 tokens)."""
    from medpipe.errors import MedpipeError

    if 2 * len(records) >= block_size:
        return
    from medpipe.data.validate import token_lengths

    total = sum(token_lengths(records, tok)) + len(records)  # + one EOS a document
    if total < block_size:
        raise MedpipeError(f"the data gives no full block of block_size={block_size} tokens ({total} tokens in "
                           f"{len(records)} documents); lower block_size or add text")


def prepared_once_per_node(ctx: Any, args: Any, prepare: Any) -> tuple[Any, int, int]:
    """`prepare()` -> (blocks, documents, excluded) on the node's local rank 0 first; it leaves a
    note naming its packed Arrow file, which the node's other ranks memory-map after the barrier.
    A rank with no note (a single process, an in-memory result) prepares for itself."""
    import json
    import os
    import socket

    from datasets import Dataset

    note = ctx.output_dir / f".cpt-blocks.{socket.gethostname()}.json"
    with args.main_process_first(local=True, desc="CPT blocks"):
        if args.local_process_index == 0 or args.world_size == 1:
            blocks, documents, excluded = prepare()
            ctx.log.info("CPT data prepared on this rank: %d documents, %d blocks", documents, len(blocks))
            files = [f["filename"] for f in getattr(blocks, "cache_files", [])]
            tmp = note.with_suffix(".tmp")
            tmp.write_text(json.dumps({"files": files, "documents": documents, "excluded": excluded}))
            os.replace(tmp, note)
            return blocks, documents, excluded
    try:
        made = json.loads(note.read_text())
    except (OSError, ValueError):
        made = {}
    if len(made.get("files") or []) != 1:
        return prepare()
    ctx.log.info("CPT data: mapped the blocks local rank 0 prepared (%s)", made["files"][0])
    return Dataset.from_file(made["files"][0]), int(made["documents"]), int(made["excluded"])


class CPTStage(TrainingKind):
    """Continued pretraining on plain text (txt, json/jsonl text field, parquet), full or LoRA."""

    Params = CPTParams
    corpus_field = "data"  # hook: `medpipe chat/serve --rag` index this stage's corpus by default

    def check(self, params: CPTParams, base: Any, data_opts: dict) -> list[str]:
        from medpipe.data import load_records
        from medpipe.stages.training.tokenizer import length_tokenizer, require_model_dir

        require_model_dir(base.model_path)
        tok = length_tokenizer(base.tokenizer_path, base.trust_remote_code)  # token-length columns per source
        if params.stream:
            return _check_streamed(params, tok, data_opts)
        result = load_records(params.data, "text", tokenizer=tok, **data_options(params, data_opts))
        kept, excluded = drop_eval_overlap(result.records, params, data_opts)
        _require_a_block(kept, tok, params.block_size)
        lines = result.summary_table().splitlines()
        return lines + ([f"{excluded} document(s) overlap exclude_data: dropped"] if params.exclude_data else [])

    def data(self, ctx: Any, tok: Any, args: Any) -> Any:
        """Packed blocks of `block_size` tokens (labels = the ids), in memory or streamed."""
        from types import SimpleNamespace

        from medpipe.errors import MedpipeError

        p: CPTParams = ctx.params
        blocks, said, counts = self._streamed(ctx, p, tok, args) if p.stream else self._in_memory(ctx, p, tok, args)
        if len(blocks) == 0:
            raise MedpipeError(f"stages.{ctx.name}: the data gives no full block of {p.block_size} tokens; "
                               f"lower block_size or add text")
        blocks = blocks.map(lambda b: {"labels": b["input_ids"]}, batched=True)
        ctx.say(f"{said}{len(blocks)} blocks of {p.block_size} tokens" + (" (streamed)" if p.stream else ""))
        return SimpleNamespace(train=blocks, heldout=None, counts=counts)

    def trainer_options(self, ctx: Any, data: Any) -> dict:
        from transformers import default_data_collator

        return {"data_collator": default_data_collator}

    def metrics(self, ctx: Any, trainer: Any, data: Any) -> dict:
        return {"blocks": len(data.train), **data.counts}

    @staticmethod
    def _in_memory(ctx: Any, p: CPTParams, tok: Any, args: Any) -> tuple[Any, str, dict]:
        from medpipe.data import load_records, pack_texts
        from medpipe.stages.training.loop import data_cache_dir

        def prepare() -> tuple[Any, int, int]:
            records = load_records(p.data, "text", **data_options(p, ctx.data)).records
            records, excluded = drop_eval_overlap(records, p, ctx.data)
            if p.exclude_data:
                ctx.say(f"{excluded} document(s) overlapping exclude_data dropped")
            blocks = pack_texts([r["text"] for r in records], tok, p.block_size, num_proc=p.num_proc,
                                cache_dir=data_cache_dir(ctx))
            return blocks, len(records), excluded

        # once per node: local rank 0 loads, dedups and packs (num_proc workers) while the other ranks
        # wait, then they map its packed blocks instead of each redoing the whole pass at once
        blocks, documents, excluded = prepared_once_per_node(ctx, args, prepare)
        return blocks, f"{documents} documents → ", {"documents": documents, "excluded_documents": excluded}

    @staticmethod
    def _streamed(ctx: Any, p: CPTParams, tok: Any, args: Any) -> tuple[Any, str, dict]:
        from medpipe.data import fingerprint
        from medpipe.data.pack import pack_stream
        from medpipe.data.validate import SourceReport, check_source_result, iter_source
        from medpipe.stages.training.loop import data_cache_dir

        opts = data_options(p, ctx.data)
        srcs = _plain_corpus(p, f"stages.{ctx.name}.stream")
        counted = {"documents": 0}

        def texts():
            for src in srcs:
                rep = SourceReport(path=src.path, format=src.format)
                n = 0
                for rec in iter_source(src, "text", opts["on_error"], rep):
                    n += 1
                    yield rec["text"]
                check_source_result(src, rep, n, "text")

        with args.main_process_first(local=True, desc="CPT blocks"):
            blocks = pack_stream(texts(), tok, p.block_size, fingerprint(p.data, want="text", stream=True, **opts),
                                 data_cache_dir(ctx), num_proc=p.num_proc, counts=counted)
        return blocks, "", {"documents": counted["documents"], "streamed": True}
