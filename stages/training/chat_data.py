"""Chat data for training: the check before training (every record read, rendered with the
stage's tokenizer, its spans found, lengths counted, the over-length policy applied) and the
tokenised dataset (cached on disk, prepared once per node). Shared by every kind that trains on
conversations (sft, MedCare, C-Poly). One conversation's ids and masks: chat_masks.py; the
stage's tokenizer: tokenizer.py."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .chat_masks import EncodeStats, Limits, _encode_many, template_shape
from .tokenizer import load_stage_tokenizer

ENCODING_VERSION = "offsets-v2"  # bump when the encoding changes: old caches are not reused
OVERLENGTH = ("truncate", "drop", "error")


# ---- the check before training -----------------------------------------------------------------

def check_chat_data(params: Any, base: Any, data_opts: dict) -> list[str]:
    """Before any training: every record reads, renders with the stage's own tokenizer and
    template, its assistant spans are found; token lengths per source; the over-length policy is
    applied and counted; a stage whose data would come out empty is refused. The encoded data
    is cached under the key `run` uses, so the stage memory-maps it instead of encoding again."""
    tok = load_stage_tokenizer(base.tokenizer_path, params, base.trust_remote_code)
    prepared = prepare_chat_data(params, data_opts, tok, cache_dir_of(data_opts), table=True)
    return prepared.lines


class Prepared:
    """What prepare_chat_data returns: train/held-out datasets, stats, the summary lines."""

    def __init__(self, train, heldout, stats, lines):
        self.train, self.heldout, self.stats, self.lines = train, heldout, stats, lines


def chat_fingerprint(params: Any, data_opts: dict, split: str) -> str:
    """Data fingerprint of a stage's chat data: the files' digests + spec + loader options (not
    the conversations themselves): computable before reading a record."""
    from medpipe.data import fingerprint
    from medpipe.stages.training.params import data_options

    return fingerprint(params.data, want="chat", split=split, heldout=getattr(params, "heldout", 0.0),
                       **data_options(params, data_opts))


def cache_dir_of(data_opts: dict) -> Path:
    cache = data_opts.get("cache_dir")
    return Path(cache).expanduser() if cache else _default_cache()


def prepare_chat_data(params: Any, data_opts: dict, tok: Any, cache_dir: Path, *, table: bool = False,
                      log: Any = None) -> Prepared:
    """Encoded train (and held-out) conversations. When both are in the cache they are memory-
    mapped without reading a record (the path of every rank but the one that prepared them, and
    of `run` after `validate`); otherwise the records are read, validated, encoded and cached."""
    from medpipe.data import load_records
    from medpipe.data.arrow import chat_arrow, streamable
    from medpipe.errors import MedpipeError
    from medpipe.stages.training.params import data_options

    limits = Limits.of(params, data_opts)
    if limits.overlength not in OVERLENGTH:
        raise MedpipeError(f"overlength: {limits.overlength!r} is not one of {', '.join(OVERLENGTH)}")
    opts = data_options(params, data_opts)
    held = getattr(params, "heldout", 0.0) > 0
    fps = {split: chat_fingerprint(params, data_opts, split) for split in (("train", "heldout") if held else ("train",))}
    num_proc = getattr(params, "num_proc", None)
    stats, lines = EncodeStats(), []
    if not table and all(_cached(cache_dir, fp, tok, limits) for fp in fps.values()):
        train = encode_dataset([], tok, limits.max_length, cache_dir, limits=limits, fingerprint=fps["train"], stats=stats)
        heldout = encode_dataset([], tok, limits.max_length, cache_dir, limits=limits,
                                 fingerprint=fps["heldout"]) if held else None
    elif not held and streamable(params.data):
        # records flow as memory-mapped Arrow from the reader to the encoder (bounded memory)
        work = Path(cache_dir) / f"read-{os.getpid()}"
        try:
            arrow = chat_arrow(params.data, work, seed=opts["seed"], on_error=opts["on_error"])
            train = encode_dataset(arrow.dataset, tok, limits.max_length, cache_dir, limits=limits,
                                   fingerprint=fps["train"], num_proc=num_proc, on_error=opts["on_error"], stats=stats)
        finally:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
        heldout = None
        if table:
            _token_columns(arrow.reports, stats.lengths, limits.max_length)
            lines = arrow.summary_table().splitlines()
    else:
        result = load_records(params.data, "chat", heldout=getattr(params, "heldout", 0.0), **opts)
        _tag_sources(params.data, result.records)
        train = encode_dataset(result.records, tok, limits.max_length, cache_dir, limits=limits, fingerprint=fps["train"],
                               num_proc=num_proc, on_error=opts["on_error"], stats=stats)
        if table:
            _token_columns(result.reports, stats.lengths, limits.max_length)
            lines = result.summary_table().splitlines()
        heldout = encode_dataset(result.heldout, tok, limits.max_length, cache_dir, limits=limits,
                                 fingerprint=fps["heldout"], num_proc=num_proc,
                                 on_error=opts["on_error"]) if held and result.heldout else None
    lines += stats.lines()
    if len(train) == 0:
        raise MedpipeError(f"no conversation keeps an assistant token (max_length={limits.max_length}, "
                           f"overlength={limits.overlength}): {stats.no_assistant} of {stats.read} lost every answer "
                           f"token, {stats.overlength_dropped} dropped as over-length, {stats.failed} failed; "
                           f"raise max_length or lower max_prompt_length")
    if log is not None:
        log.info("chat data %s: %d conversations (%s)", "prepared by this process" if stats.prepared_by ==
                 "this process" else "memory-mapped from the cache", len(train), cache_dir)
    return Prepared(train, heldout, stats, lines)


def _tag_sources(spec: Any, records: list[dict]) -> None:
    """records[i]["_src"] = index of the source its file belongs to (for per-source lengths)."""
    from medpipe.data import parse_spec
    from medpipe.data.sources import expand_paths

    of = {f: i for i, src in enumerate(parse_spec(spec)) for f in expand_paths(src)}
    for r in records:
        r["_src"] = of.get(str(r.get("_loc", "")).rpartition(":")[0], 0)


def _token_columns(reports, lengths: dict, max_length: int) -> None:
    """p50/p90/p99/max token length per source from the encoding itself (every record, exact,
    after the prompt/answer cuts, before the max_length cut) and how many are over max_length."""
    import numpy as np

    for i, rep in enumerate(reports):
        n = np.sort(np.asarray(lengths.get(i, []), dtype=np.int64))
        if not len(n):
            continue
        pick = lambda q: int(n[min(len(n) - 1, max(0, int(round(q / 100 * (len(n) - 1)))))])  # noqa: E731
        rep.token_p50, rep.token_p90, rep.token_p99, rep.token_max = pick(50), pick(90), pick(99), int(n[-1])
        rep.token_sample = len(n)
        rep.overlength = int((n > max_length).sum())


def _cached(cache_dir: Path, fp: str, tok: Any, limits: "Limits") -> bool:
    return (Path(cache_dir) / f"sft-{cache_key(fp, tok, limits)}" / "dataset_info.json").is_file()


def _default_cache() -> Path:
    from medpipe.paths import cache_root

    return cache_root() / "data"


# ---- the dataset -------------------------------------------------------------------------------

def records_digest(records: list[dict]) -> str:
    """Streaming sha256 of the conversations (no giant string); used when the caller has no data
    fingerprint of its own."""
    h = hashlib.sha256(b"chat-records\0")
    for r in records:
        h.update(json.dumps(r["messages"], ensure_ascii=False, separators=(",", ":")).encode())
        h.update(b"\0")
    return h.hexdigest()


def cache_key(data_fp: str, tok: Any, limits: Limits) -> str:
    from medpipe.data.pack import tokenizer_digest

    h = hashlib.sha256(f"{ENCODING_VERSION}|{data_fp}|{tokenizer_digest(tok)}|{tok.chat_template}|".encode())
    h.update(json.dumps(limits.__dict__, sort_keys=True).encode())
    return h.hexdigest()[:20]


def default_num_proc(n_records: int) -> int | None:
    """The cores this process may use, but no more than one per 2,000 conversations (starting a
    worker costs more than encoding a few hundred)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = min(cores, max(1, n_records // 2000))
    return n if n > 1 else None


def _encoded_features():
    """Compact columns: ids int32, masks int8 (python ints would be stored as int64: 16 bytes a token)."""
    from datasets import Features, List, Value

    return Features({"input_ids": List(Value("int32")), "assistant_masks": List(Value("int8")),
                     "error": Value("string"), "prompt_cut": Value("bool"), "response_cut": Value("bool"),
                     "overlength": Value("bool"), "folded": Value("bool"), "has_answer": Value("bool"),
                     "answers": Value("int32"), "n_tokens": Value("int32"), "_loc": Value("string"),
                     "_src": Value("int32")})


def _map_batch(batch, tok, shape, limits):
    rows = _encode_many(batch["messages"], tok, shape, limits)
    out = {k: [r[k] for r in rows] for k in rows[0]} if rows else {}
    out["_loc"], out["_src"] = batch["_loc"], batch["_src"]
    return out


def encode_dataset(records: list[dict], tok: Any, max_length: int, cache_dir=None, *, limits: Limits | None = None,
                   fingerprint: str | None = None, num_proc: int | None = None, on_error: str = "fail",
                   stats: EncodeStats | None = None, log: Any = None):
    """Tokenised conversations (input_ids, assistant_masks) as a memory-mapped Arrow dataset.

    Encoded with a batched ``datasets.map`` (``num_proc`` processes, default: the cores available),
    cached in ``cache_dir`` under (data fingerprint, tokenizer, template, limits): a rerun, a
    second rank and `run` after `validate` memory-map the cache. Over-length policy and template
    errors as ``limits``/``on_error`` say; a record that fails names its file:line."""
    from medpipe.data import DataError

    limits = limits or Limits(max_length)
    stats = stats if stats is not None else EncodeStats()
    stats.read = len(records)
    key = cache_key(fingerprint or records_digest(records), tok, limits)
    path = Path(cache_dir) / f"sft-{key}" if cache_dir is not None else None
    if path is not None and (path / "dataset_info.json").is_file():
        return _load_cached(path, stats)
    ds = _encode(records, tok, limits, num_proc)
    ds = _apply_policy(ds, limits, on_error, stats, DataError)
    if path is None or len(ds) == 0:  # datasets cannot load an empty saved dataset back
        stats.prepared_by = "this process"
        return ds
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    ds.save_to_disk(str(tmp))
    (tmp / "medpipe_stats.json").write_text(json.dumps({k: v for k, v in stats.__dict__.items()
                                                        if k not in ("prepared_by", "lengths")}))
    _save_lengths(tmp, stats.lengths)
    try:
        tmp.rename(path)
    except OSError:  # another process cached it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return _load_cached(path, stats, prepared=True)


def _save_lengths(path: Path, lengths: dict) -> None:
    import numpy as np

    np.savez_compressed(path / "medpipe_lengths.npz", **{str(k): np.asarray(v, dtype=np.int32) for k, v in lengths.items()})


def _load_lengths(path: Path) -> dict:
    import numpy as np

    f = path / "medpipe_lengths.npz"
    if not f.is_file():
        return {}
    with np.load(f) as z:
        return {int(k): z[k].tolist() for k in z.files}


def _load_cached(path: Path, stats: EncodeStats, prepared: bool = False):
    from datasets import load_from_disk

    saved = path / "medpipe_stats.json"
    if saved.is_file() and not prepared:
        stats.__dict__.update(json.loads(saved.read_text()))
        stats.lengths = _load_lengths(path)
    stats.prepared_by = "this process" if prepared else "cache"
    return load_from_disk(str(path))  # memory-mapped Arrow files


def _encode(records: list[dict], tok: Any, limits: Limits, num_proc: int | None):
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    shape = template_shape(tok)
    if not isinstance(records, list):  # already Arrow (medpipe.data.arrow): columns messages, _loc, _src
        if num_proc is None:
            num_proc = default_num_proc(len(records))
        if not len(records):
            return _empty()
        return records.map(_map_batch, batched=True, batch_size=256, num_proc=num_proc, remove_columns=["messages"],
                           fn_kwargs={"tok": tok, "shape": shape, "limits": limits}, load_from_cache_file=False,
                           writer_batch_size=2000, features=_encoded_features())
    base = Dataset.from_dict({"messages": [[{"role": m["role"], "content": m["content"]} for m in r["messages"]]
                                           for r in records],
                              "_loc": [r.get("_loc") or f"record[{i}]" for i, r in enumerate(records)],
                              "_src": [r.get("_src", 0) for r in records]})
    if num_proc is None:
        num_proc = default_num_proc(len(records))
    if not records:
        return _empty()
    return base.map(_map_batch, batched=True, batch_size=256, num_proc=num_proc, remove_columns=["messages"],
                    fn_kwargs={"tok": tok, "shape": shape, "limits": limits}, load_from_cache_file=False,
                    features=_encoded_features())


def _apply_policy(ds, limits: Limits, on_error: str, stats: EncodeStats, DataError):
    """Errors, over-length policy, conversations without an answer token: counted, dropped
    (column operations: no per-row python objects for the whole set)."""
    import numpy as np
    import pyarrow.compute as pc

    if not len(ds):
        return _empty()
    t = ds.data
    col = lambda n: t.column(n).combine_chunks()  # noqa: E731
    error = col("error")
    bad = np.asarray(pc.not_equal(error, "").to_numpy(zero_copy_only=False), dtype=bool)
    if bad.any():
        first = np.nonzero(bad)[0]
        locs = col("_loc").take(first[:5]).to_pylist()
        msgs = error.take(first[:5]).to_pylist()
        if on_error != "skip":
            raise _located(DataError, locs[0], msgs[0])
        stats.failed += int(bad.sum())
        stats.errors += [f"{l}: {m}" for l, m in zip(locs, msgs)][: 5 - len(stats.errors)]
    flag = lambda n: np.asarray(col(n).to_numpy(zero_copy_only=False), dtype=bool) & ~bad  # noqa: E731
    over = flag("overlength")
    if over.any() and limits.overlength == "error":
        i = int(np.nonzero(over)[0][0])
        raise _located(DataError, col("_loc")[i].as_py(), f"longer than max_length={limits.max_length} tokens "
                                                         f"(overlength=error; set overlength: truncate or drop)", "overlength")
    stats.prompt_cut += int(flag("prompt_cut").sum())
    stats.response_cut += int(flag("response_cut").sum())
    stats.system_folded += int(flag("folded").sum())
    keep = ~bad
    if limits.overlength == "drop":
        stats.overlength_dropped += int(over.sum())
        keep &= ~over
    else:
        stats.truncated += int(over.sum())
    answer = flag("has_answer")
    stats.no_assistant += int((keep & ~answer).sum())
    keep &= answer
    stats.multi_turn += int((keep & (col("answers").to_numpy(zero_copy_only=False) > 1)).sum())
    src = col("_src").to_numpy(zero_copy_only=False)
    ntok = col("n_tokens").to_numpy(zero_copy_only=False)
    for s_ in np.unique(src[~bad]):
        stats.lengths.setdefault(int(s_), []).extend(ntok[(src == s_) & ~bad].tolist())
    idx = np.nonzero(keep)[0]
    stats.kept = len(idx)
    if not len(idx):
        return _empty()
    ds = ds.select(idx) if len(idx) != len(ds) else ds
    return ds.select_columns(["input_ids", "assistant_masks"])


def _empty():
    from datasets import Dataset, Features, Sequence, Value

    return Dataset.from_dict({"input_ids": [], "assistant_masks": []},
                             features=Features({"input_ids": Sequence(Value("int32")),
                                                "assistant_masks": Sequence(Value("int8"))}))


def _located(DataError, loc: str, problem: str, reason: str = "template"):
    path, _, line = str(loc).rpartition(":")
    if not path:
        return DataError(problem, None, loc, "messages", reason=reason)
    return DataError(problem, path, line, "messages", reason=reason)


def with_labels(ds):
    """`labels` (the ids, -100 where the assistant mask is 0) in place of `assistant_masks`, computed
    on whole Arrow columns. The encoder already cut every conversation to max_length and dropped
    those with no answer token, so with labels present the trainer can skip TRL's own preparation
    (three more passes over the rows: build labels, truncate, drop fully masked; 6 min 55 s of a
    1M-conversation SFT stage, measured) — for unpacked SFT; packing needs TRL's pass."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    def label_batch(table):
        ids, masks = table.column("input_ids").combine_chunks(), table.column("assistant_masks").combine_chunks()
        flat_ids = ids.flatten().to_numpy(zero_copy_only=False)  # flatten() honours a sliced batch
        flat_mask = masks.flatten().to_numpy(zero_copy_only=False)
        labels = np.where(flat_mask != 0, flat_ids, -100).astype(np.int32)
        lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        return pa.table({"input_ids": ids, "labels": pa.ListArray.from_arrays(offsets, pa.array(labels))})

    if ds is None:
        return None
    return ds.with_format("arrow").map(label_batch, batched=True, batch_size=10_000, remove_columns=["assistant_masks"],
                                       desc="labels").with_format(None)

