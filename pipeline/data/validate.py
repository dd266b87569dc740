"""Reading + validating every record of a stage's data, then dedup, held-out split and mixing.

``load_records`` is what stages call; ``medpipe validate`` calls it for every stage and prints
``LoadResult.summary_table()``.

The path every record of every stage takes, in order: read → per-record conversion (the format
adapters of formats.py) → token lengths and the over-length policy → dedup → held-out split → mix;
the counts of the validate table (`SourceReport`) are filled along it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from .dedup import clusters, key_hash, record_key
from .detect import detect_format
from .errors import DataError
from .formats import FORMATS, Ctx
from .mix import mix_sources
from .readers import RawReader, container_of
from .render import chat_to_text, mcq_to_chat, mcq_to_text, qa_to_chat, qa_to_text, mcq_prompt, \
    mcq_answer
from .sources import SourceSpec, expand_paths, parse_spec

WANTS = ("text", "chat", "preference", "feedback", "mcq")
# which record kinds can feed which want (feedback: KTO's labelled answers; pairs stay pairs, the
# kto stage splits each into a good and a bad answer)
COMPAT = {"text": ("text", "qa", "mcq"), "chat": ("chat", "qa", "mcq"),
          "preference": ("preference",), "feedback": ("feedback", "preference"), "mcq": ("mcq",)}
MAX_EXAMPLES = 5


@dataclass
class SourceReport:
    path: str
    format: str
    reason: str = ""                 # why this format (detection) or "set in the spec"
    records: int = 0                 # records read (incl. unreadable lines)
    kept: int = 0                    # after validation, overlength drops and dedup
    dropped_by_reason: dict = field(default_factory=dict)
    duplicates: int = 0              # exact/near duplicates of an earlier record (any source)
    overlength: int = 0              # records longer than max_length (dropped or truncated)
    truncated: int = 0               # overlength records kept (policy truncate)
    token_p50: int | None = None
    token_p90: int | None = None
    token_p99: int | None = None
    token_max: int | None = None
    token_sample: int = 0            # records tokenized for the statistics (see token_stats)
    heldout: int = 0
    identical_pairs: int = 0         # preference pairs with chosen == rejected (DPO drops them)
    ids_missing: int = 0             # ids listed in `ids:` that no record has
    mixed: int = 0                   # records this source contributes to the mixed train set
    weight: float | None = None
    examples: list = field(default_factory=list)   # first few error messages (skip mode)

    @property
    def dropped(self) -> int:
        return sum(self.dropped_by_reason.values())

    def drop(self, reason: str, n: int = 1):
        self.dropped_by_reason[reason] = self.dropped_by_reason.get(reason, 0) + n

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        d["dropped"] = self.dropped
        return d


@dataclass
class LoadResult:
    records: list
    heldout: list
    reports: list
    want: str = "text"
    seed: int = 0

    @property
    def skipped(self) -> int:
        return sum(r.dropped for r in self.reports)

    def summary_table(self) -> str:
        return summary_table(self.reports)

    def to_dict(self) -> dict:
        return {"want": self.want, "seed": self.seed, "records": len(self.records),
                "heldout": len(self.heldout), "sources": [r.to_dict() for r in self.reports]}


def summary_table(reports) -> str:
    hdr = ["source", "format", "records", "kept", "dropped", "why dropped", "dups", "heldout",
           "mixed", "tok p50", "p90", "p99", "max"]
    rows = []
    for r in reports:
        why = ", ".join(f"{k}={v}" for k, v in sorted(r.dropped_by_reason.items())) or "-"
        f = lambda v: "-" if v is None else str(v)  # noqa: E731
        rows.append([_short(r.path), r.format, str(r.records), str(r.kept), str(r.dropped), why,
                     str(r.duplicates), str(r.heldout), str(r.mixed), f(r.token_p50),
                     f(r.token_p90), f(r.token_p99), f(r.token_max)])
    if len(reports) > 1:
        rows.append(["total", "", *(str(sum(getattr(r, a) for r in reports)) for a in
                                    ("records", "kept", "dropped")), "",
                     str(sum(r.duplicates for r in reports)),
                     str(sum(r.heldout for r in reports)),
                     str(sum(r.mixed for r in reports)), "", "", "", ""])
    w = [max(len(h), *(len(x[i]) for x in rows)) if rows else len(h) for i, h in enumerate(hdr)]
    line = lambda cells: "  ".join(c.ljust(w[i]) for i, c in enumerate(cells)).rstrip()  # noqa
    out = [line(hdr), line(["-" * x for x in w])] + [line(x) for x in rows]
    for r in reports:
        if r.identical_pairs:
            out.append(f"{_short(r.path)}: {r.identical_pairs} preference pair(s) with chosen == rejected "
                       f"(the DPO stage drops them)")
        if r.ids_missing:
            out.append(f"{_short(r.path)}: {r.ids_missing} id(s) listed in ids: match no record")
        if r.overlength:
            out.append(f"{_short(r.path)}: {r.overlength} record(s) longer than max_length tokens "
                       f"({'dropped' if r.dropped_by_reason.get('overlength') else 'truncated'})")
    return "\n".join(out)


def _short(p: str, n: int = 48) -> str:
    try:
        rel = str(Path(p).resolve().relative_to(Path.cwd()))
        p = rel
    except ValueError:
        pass
    return p if len(p) <= n else "…" + p[-(n - 1):]


# ---- per-record conversion -------------------------------------------------------------------

def _converter(kind: str, want: str, task):
    if kind == want or (kind, want) == ("preference", "feedback"):
        return None
    if (kind, want) == ("qa", "text"):
        return qa_to_text
    if (kind, want) == ("qa", "chat"):
        return lambda r: qa_to_chat(r, task)
    if (kind, want) == ("mcq", "text"):
        return mcq_to_text
    if (kind, want) == ("mcq", "chat"):
        return mcq_to_chat
    raise AssertionError((kind, want))


def _iter_file(path: str, fmt: str, src: SourceSpec, want: str, on_error: str, report,
               budget: list, ids_cache: dict | None = None):
    """The records of one file, validated, one at a time (memory: one record)."""
    spec = FORMATS[fmt]
    conv = _converter(spec.kind, want, src.task)
    needs_answer = spec.kind == "mcq" and want != "mcq"
    cop_base = spec.cop_base(path, container_of(path), src.cop_base) if spec.cop_base else src.cop_base
    reader = RawReader(path, on_error=on_error, paragraphs=fmt == "paragraphs",
                       max_record_bytes=src.max_record_bytes)
    ids = ids_cache.get(id(src)) if ids_cache is not None else None
    ctx = Ctx(path=path, rev={v: k for k, v in (src.columns or {}).items()},
              task=src.task, cop_base=cop_base, container=reader.kind)
    cols = src.columns
    fn = spec.fn
    first = True
    n_skipped = 0
    progress = Progress(path)
    for line, raw in reader:
        if report.records & 4095 == 0:
            progress.tick(report.records, reader.bytes_read)
        if first:
            ctx.file_keys = reader.file_keys
            first = False
        if len(reader.skipped) > n_skipped:
            n_skipped = _flush_unreadable(reader, n_skipped, report, budget)
        if budget[0] is not None and budget[0] <= 0:
            break
        report.records += 1
        if budget[0] is not None:
            budget[0] -= 1
        ctx.line = line
        if cols:
            raw = {cols.get(k, k): v for k, v in raw.items()}
        try:
            rec = fn(raw, ctx)
            if needs_answer and not rec["answer"]:
                raise ctx.err("no answer (unlabeled split); only evaluation can use it",
                              spec.answer_field, "unlabeled")
            if conv is not None:
                rec = conv(rec)
        except DataError as e:
            if on_error != "skip":
                raise
            _count_error(report, e)
            continue
        if ids is not None:
            rid = rec.get("id")
            if rid is None:
                raise DataError(f"ids: format '{fmt}' records carry no id to filter on", src.path, None,
                                "ids", reason="type")
            if str(rid).strip() not in ids:
                report.drop("not_in_ids")
                continue
            ids_cache["seen"].add(str(rid).strip())
        if spec.kind == "preference" and rec["chosen"].strip() == rec["rejected"].strip():
            report.identical_pairs += 1
        rec["_loc"] = f"{path}:{line}"
        yield rec
    progress.done(report.records)
    _flush_unreadable(reader, n_skipped, report, budget)


class Progress:
    """records/s and ETA on stderr while a long file is read (from the bytes read so far); silent
    for files read in under 3 s, and when MEDPIPE_PROGRESS=0."""

    def __init__(self, path: str, every: float = 3.0):
        import os
        import sys
        import time

        self.path, self.every, self.t0, self.last = path, every, time.monotonic(), time.monotonic()
        self.size = os.path.getsize(path) if os.path.isfile(path) else 0
        self.out = sys.stderr
        self.on = os.environ.get("MEDPIPE_PROGRESS", "1") != "0"
        self.shown = False

    def tick(self, n: int, nbytes: int):
        import time

        now = time.monotonic()
        if not self.on or now - self.last < self.every:
            return
        self.last = now
        rate = n / max(now - self.t0, 1e-9)
        frac = nbytes / self.size if self.size and nbytes else 0.0
        eta = (now - self.t0) * (1 - frac) / frac if frac > 0 else None
        eta_s = "" if eta is None else f", {100 * frac:.0f}%, ETA {int(eta) // 60}:{int(eta) % 60:02d}"
        print(f"  reading {_short(self.path)}: {n:,} records, {rate:,.0f} records/s{eta_s}",
              file=self.out, flush=True)
        self.shown = True

    def done(self, n: int):
        import time

        if self.shown:
            dt = time.monotonic() - self.t0
            print(f"  read {_short(self.path)}: {n:,} records in {dt:.0f} s ({n / max(dt, 1e-9):,.0f} records/s)",
                  file=self.out, flush=True)


def _count_error(report, e: DataError):
    report.drop(e.reason)
    if len(report.examples) < MAX_EXAMPLES:
        report.examples.append(str(e))


def _flush_unreadable(reader, n_done, report, budget) -> int:
    """Lines the reader could not turn into a record (bad JSON, wrong CSV width) count as
    records read and as dropped."""
    for e in reader.skipped[n_done:]:
        report.records += 1
        if budget[0] is not None:
            budget[0] -= 1
        _count_error(report, e)
    return len(reader.skipped)


def read_source(src: SourceSpec, want: str, on_error: str = "fail") -> tuple[list, SourceReport]:
    """Read and validate one source → (normalised records with ``_loc``, report)."""
    report = SourceReport(path=src.path, format=src.format, weight=src.weight)
    out = list(iter_source(src, want, on_error, report))
    check_source_result(src, report, len(out), want)
    return out, report


def iter_source(src: SourceSpec, want: str, on_error: str, report: SourceReport):
    """The validated records of one source, streamed (``report`` is filled as they go); call
    :func:`check_source_result` after the last one."""
    files = expand_paths(src)
    fmts, reasons = [], []
    budget = [src.limit]
    from .sources import load_ids
    wanted = load_ids(src)
    ids_cache = {id(src): wanted, "seen": set()} if wanted is not None else None
    report._ids = (wanted, ids_cache)
    for path in files:
        if src.format == "auto":
            fmt, why = detect_format(path, src.columns)
        else:
            fmt, why = src.format, "set in the spec"
        kind = FORMATS[fmt].kind
        if kind not in COMPAT[want]:
            raise DataError(f"format '{fmt}' gives {kind} records; a stage that wants {want} "
                            f"records can use: "
                            f"{', '.join(n for n, f in FORMATS.items() if f.kind in COMPAT[want])}",
                            path, None, "format", reason="incompatible_format")
        if fmt not in fmts:
            fmts.append(fmt)
            reasons.append(why)
        report.format = "+".join(fmts)
        report.reason = "; ".join(reasons)
        yield from _iter_file(path, fmt, src, want, on_error, report, budget, ids_cache)
        if budget[0] is not None and budget[0] <= 0:
            break


def check_source_result(src: SourceSpec, report: SourceReport, n_out: int, want: str) -> None:
    wanted, ids_cache = getattr(report, "_ids", (None, None))
    if wanted is not None:
        report.ids_missing = len(wanted - ids_cache["seen"])
    if n_out and want in ("preference", "feedback") and report.identical_pairs == n_out:
        raise DataError(f"no usable preference pairs: all {n_out} have chosen == rejected",
                        src.path, None, "chosen", reason="identical_pair")
    if report.records == 0:
        raise DataError("no records (empty dataset)", src.path, None, None,
                        reason="empty_dataset")
    if not n_out:
        raise DataError(f"no usable records: all {report.records} dropped "
                        f"({report.dropped_by_reason}); first: "
                        f"{report.examples[0] if report.examples else '-'}", src.path, None,
                        None, reason="empty_dataset")


# ---- token lengths -----------------------------------------------------------------------

def _render_for_length(rec: dict, tokenizer) -> str:
    if "text" in rec:
        return rec["text"]
    if "messages" in rec:
        msgs = rec["messages"]
    elif "completion" in rec:
        msgs = rec["prompt"] + [{"role": "assistant", "content": rec["completion"]}]
    elif "prompt" in rec:
        longer = max(rec["chosen"], rec["rejected"], key=len)
        msgs = rec["prompt"] + [{"role": "assistant", "content": longer}]
    else:  # mcq
        msgs = [{"role": "user", "content": mcq_prompt(rec)}]
        if rec["answer"]:
            msgs.append({"role": "assistant", "content": mcq_answer(rec)})
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False)
        except Exception:  # noqa: BLE001 - templates that reject a role order: plain rendering
            pass
    return chat_to_text({"messages": msgs})


def token_lengths(records: list, tokenizer, batch: int = 4096) -> list[int]:
    """Token count of each record as it will be trained (chat template when the tokenizer has
    one). Batched through the fast tokenizer."""
    texts = [_render_for_length(r, tokenizer) for r in records]
    return _count_tokens(texts, tokenizer, batch)


def _count_tokens(texts: list[str], tokenizer, batch: int = 4096) -> list[int]:
    out: list[int] = []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None and hasattr(tokenizer, "encode_batch"):
        backend = tokenizer                       # a bare tokenizers.Tokenizer
    for i in range(0, len(texts), batch):
        chunk = texts[i:i + batch]
        if backend is not None:
            enc = backend.encode_batch_fast(chunk, add_special_tokens=False) \
                if hasattr(backend, "encode_batch_fast") else \
                backend.encode_batch(chunk, add_special_tokens=False)
            out.extend(len(e.ids) for e in enc)
        else:
            ids = tokenizer(chunk, add_special_tokens=False, return_attention_mask=False,
                            return_token_type_ids=False)["input_ids"]
            out.extend(len(x) for x in ids)
    return out


# A token covers at least one UTF-8 byte for byte-level BPE / SentencePiece-with-byte-fallback
# / char-level vocabularies; a few extra for a dummy prefix. So a record whose rendered text has
# at most ``max_length - BYTE_SLACK`` bytes cannot be over-length and needs no tokenization.
BYTE_SLACK = 8
STATS_SAMPLE = 10_000


def token_stats(records: list, tokenizer, max_length: int | None, seed: int = 0,
                sample: int = STATS_SAMPLE):
    """→ (token length by record index for the records tokenized, indices over max_length,
    indices of the percentile sample). Exact over-length check for every record (records that can't be over
    by their byte length are skipped); percentiles from all records up to ``sample`` records,
    else from a seeded random sample of that size."""
    texts = [_render_for_length(r, tokenizer) for r in records]
    n = len(texts)
    pick = range(n) if n <= sample else random.Random(seed).sample(range(n), sample)
    idx = set(pick)
    if max_length:
        lim = max_length - BYTE_SLACK
        idx.update(i for i, t in enumerate(texts) if len(t) > lim // 4 and
                   len(t.encode("utf-8")) > lim)
    order = sorted(idx)
    lens = dict(zip(order, _count_tokens([texts[i] for i in order], tokenizer)))
    over = [i for i, k in lens.items() if max_length and k > max_length]
    return lens, sorted(over), sorted(pick)


def _pct(sorted_vals: list[int], q: float) -> int:
    if not sorted_vals:
        return 0
    k = min(len(sorted_vals) - 1, max(0, int(round(q / 100 * (len(sorted_vals) - 1)))))
    return sorted_vals[k]


# ---- the whole stage ---------------------------------------------------------------------

def load_records(spec, want: str, *, seed: int = 0, on_error: str = "fail", base_dir=None,
                 tokenizer=None, max_length: int | None = None, overlength: str = "truncate",
                 heldout: float = 0.0) -> LoadResult:
    """Read, validate, dedup, split and mix a stage's data.

    want       "text" | "chat" | "preference" | "feedback" | "mcq"
    on_error   "fail" (default: the first broken record raises DataError with its location)
               | "skip" (broken records are counted per reason in the reports)
    tokenizer  optional: token-length percentiles per source, and the over-length check
    max_length with a tokenizer: records longer are counted; ``overlength="drop"`` drops them,
               ``"truncate"`` keeps them (the trainer truncates to max_length)
    heldout    default held-out fraction for sources that don't set their own
    """
    if want not in WANTS:
        raise ValueError(f"want must be one of {WANTS}, got {want!r}")
    if on_error not in ("fail", "skip"):
        raise DataError(f"on_error must be 'fail' or 'skip', got {on_error!r}", "data", None,
                        "on_error", reason="type")
    if overlength not in ("truncate", "drop"):
        raise DataError(f"overlength must be 'truncate' or 'drop', got {overlength!r}", "data",
                        None, "overlength", reason="type")
    srcs = parse_spec(spec, base_dir=base_dir)
    parts, reports = [], []
    for src in srcs:
        recs, rep = read_source(src, want, on_error)
        if tokenizer is not None:
            lens, over, pick = token_stats(recs, tokenizer, max_length, seed=seed)
            rep.token_sample = len(lens)
            if max_length:
                rep.overlength = len(over)
                if overlength == "drop" and over:
                    drop = set(over)
                    recs = [r for i, r in enumerate(recs) if i not in drop]
                    lens = {i: k for i, k in lens.items() if i not in drop}
                    rep.drop("overlength", len(over))
                    if not recs:
                        raise DataError(f"no usable records: all {len(over)} are longer than "
                                        f"max_length={max_length} (overlength=drop)", rep.path,
                                        None, None, reason="empty_dataset")
                else:
                    rep.truncated = len(over)
            s = sorted(lens[i] for i in pick if i in lens)      # unbiased sample
            rep.token_p50, rep.token_p90, rep.token_p99 = (_pct(s, q) for q in (50, 90, 99))
            rep.token_max = max(lens.values(), default=0)
        parts.append(recs)
        reports.append(rep)

    _dedup(parts, reports, srcs)

    fracs = [s.heldout or heldout for s in srcs]
    held: list = []
    if any(f > 0 for f in fracs):
        parts, held_parts = _carve_heldout(parts, fracs, seed)
        for rep, h in zip(reports, held_parts):
            rep.heldout = len(h)
            held.extend(h)
        random.Random(seed + 1).shuffle(held)
    for rep, p in zip(reports, parts):
        rep.kept = len(p) + rep.heldout
        if not p:
            raise DataError("no records left for training after dedup/held-out", rep.path, None,
                            None, reason="empty_dataset")

    mixed, counts = mix_sources(parts, [s.weight for s in srcs], seed=seed)
    for rep, c in zip(reports, counts):
        rep.mixed = c
    return LoadResult(records=mixed, heldout=held, reports=reports, want=want, seed=seed)


def validate(spec, want: str, **kw) -> LoadResult:
    """Alias of :func:`load_records` for ``medpipe validate``."""
    return load_records(spec, want, **kw)


def _dedup(parts, reports, srcs):
    """Count duplicates (exact normalised key; across sources, in source order) and remove them
    from sources with ``dedup: exact|near``; near duplicates via MinHash LSH for ``near``."""
    seen: set = set()
    for i, (recs, rep, src) in enumerate(zip(parts, reports, srcs)):
        keep = []
        for r in recs:
            h = key_hash(record_key(r))
            if h in seen:
                rep.duplicates += 1
                if src.dedup != "none":
                    rep.drop("duplicate")
                    continue
            else:
                seen.add(h)
            keep.append(r)
        parts[i] = keep
    if any(s.dedup == "near" for s in srcs):
        flat = [(i, r) for i, p in enumerate(parts) for r in p]
        cl = clusters([record_key(r) for _, r in flat], near=True)
        firsts: set = set()
        drop = set()
        for k, (i, _) in enumerate(flat):
            c = cl[k]
            if c in firsts:
                if srcs[i].dedup == "near":
                    drop.add(k)
                    reports[i].duplicates += 1
                    reports[i].drop("near_duplicate")
            else:
                firsts.add(c)
        if drop:
            new = [[] for _ in parts]
            for k, (i, r) in enumerate(flat):
                if k not in drop:
                    new[i].append(r)
            parts[:] = new


def _carve_heldout(parts, fracs, seed):
    """Per-source held-out sets made of whole duplicate clusters (exact + near, across all
    sources), so no cluster straddles train and held-out."""
    flat = [(i, r) for i, p in enumerate(parts) for r in p]
    cl = clusters([record_key(r) for _, r in flat], near=True)
    members: dict[int, list[int]] = {}
    for k, c in enumerate(cl):
        members.setdefault(c, []).append(k)
    order = sorted(members)
    random.Random(seed).shuffle(order)
    want = [round(len(p) * f) for p, f in zip(parts, fracs)]
    got = [0] * len(parts)
    is_held = [False] * len(flat)
    for c in order:
        ks = members[c]
        i = flat[ks[0]][0]   # the cluster's first member decides which source quota it fills
        if got[i] < want[i]:
            for k in ks:
                is_held[k] = True
                got[flat[k][0]] += 1 if flat[k][0] == i else 0
    train = [[] for _ in parts]
    held = [[] for _ in parts]
    for k, (i, r) in enumerate(flat):
        (held if is_held[k] else train)[i].append(r)
    return train, held
