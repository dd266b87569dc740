"""Chat records as memory-mapped Arrow, from reading to the trainer, in bounded memory.

``chat_arrow`` streams every source through the same per-record validation as ``load_records``
(same errors, same ``file:line: field``) into one Arrow file per source (written in batches,
then memory-mapped), counts and removes exact duplicates on a column of 16-byte key hashes, and
mixes on record indices with the same seeded draws as :func:`mix.mix_sources` — so the mixed
order is the one ``load_records`` gives for the same spec, without a list of dicts. Held-out
splits and near-dedup (which cluster by MinHash over all records) still take the list path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .dedup import key_hash, record_key
from .errors import DataError
from .mix import mix_sources
from .sources import parse_spec


@dataclass
class ArrowChat:
    """``dataset``: the mixed train conversations (columns messages, _loc, _src), memory-mapped;
    ``reports``: one SourceReport per source, as load_records fills them."""

    dataset: object
    reports: list
    want: str = "chat"

    def summary_table(self) -> str:
        from .validate import summary_table

        return summary_table(self.reports)


def streamable(spec, heldout: float = 0.0, base_dir=None) -> bool:
    """Can this spec take the Arrow path (no held-out split, no near-dedup)?"""
    srcs = parse_spec(spec, base_dir=base_dir)
    return heldout <= 0 and all(s.heldout <= 0 and s.dedup != "near" for s in srcs)


def _features():
    from datasets import Features, List, Value

    return Features({"messages": List({"role": Value("string"), "content": Value("string")}),
                     "_loc": Value("string"), "_src": Value("int32")})


def chat_arrow(spec, workdir: str | os.PathLike, *, seed: int = 0, on_error: str = "fail", base_dir=None,
               batch: int = 10_000) -> ArrowChat:
    """Read, validate, exact-dedup and mix a chat spec into memory-mapped Arrow under ``workdir``."""
    import numpy as np
    from datasets import Dataset, concatenate_datasets
    from datasets.arrow_writer import ArrowWriter

    from .validate import SourceReport, check_source_result, iter_source

    srcs = parse_spec(spec, base_dir=base_dir)
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    feats = _features()
    parts, reports, hashes = [], [], []
    for i, src in enumerate(srcs):
        rep = SourceReport(path=src.path, format=src.format, weight=src.weight)
        path = work / f"source-{i}-{os.getpid()}.arrow"
        keys = []
        n = 0
        with ArrowWriter(features=feats, path=str(path), writer_batch_size=batch) as w:
            for rec in iter_source(src, "chat", on_error, rep):
                msgs = [{"role": m["role"], "content": m["content"]} for m in rec["messages"]]
                w.write({"messages": msgs, "_loc": rec["_loc"], "_src": i})
                keys.append(key_hash(record_key(rec)))
                n += 1
            w.finalize()
        check_source_result(src, rep, n, "chat")
        parts.append(Dataset.from_file(str(path)))
        hashes.append(np.frombuffer(b"".join(keys), dtype="S16") if keys else np.zeros(0, dtype="S16"))
        reports.append(rep)

    keep = _exact_dedup(hashes, reports, srcs)
    # mixing on indices: the same rng draws as mix_sources on the record lists
    offsets = np.cumsum([0] + [len(p) for p in parts])
    index_parts = [(offsets[i] + k).tolist() for i, k in enumerate(keep)]
    mixed, counts = mix_sources(index_parts, [s.weight for s in srcs], seed=seed)
    for rep, k, c in zip(reports, keep, counts):
        rep.kept = len(k)
        rep.mixed = c
        if not len(k):
            raise DataError("no records left for training after dedup", rep.path, None, None, reason="empty_dataset")
    full = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return ArrowChat(full.select(np.asarray(mixed, dtype=np.int64)), reports)


def _exact_dedup(hashes, reports, srcs):
    """Per source: indices kept. A record whose key hash was seen earlier (this or an earlier
    source, in source order) counts as a duplicate; sources with ``dedup`` set drop it."""
    import numpy as np

    allh = np.concatenate(hashes) if hashes else np.zeros(0, dtype="S16")
    _, first = np.unique(allh, return_index=True)
    is_first = np.zeros(len(allh), dtype=bool)
    is_first[first] = True
    out, start = [], 0
    for h, rep, src in zip(hashes, reports, srcs):
        f = is_first[start:start + len(h)]
        rep.duplicates += int((~f).sum())
        if src.dedup != "none":
            rep.drop("duplicate", int((~f).sum()))
            out.append(np.nonzero(f)[0])
        else:
            out.append(np.arange(len(h)))
        start += len(h)
    return out
