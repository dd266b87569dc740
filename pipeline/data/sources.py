"""Source specs: how a stage names its data.

A stage's ``data`` is one of

* a path string (``samples/pretrain.jsonl``, a directory, or a glob),
* a name of a file in ``conf/data/`` (``medqa`` → ``conf/data/medqa.yaml``, holding a source
  dict, a list of them, or ``{sources: [...]}``),
* a dict ``{path, format, columns, split, limit, weight, task, cop_base, heldout, dedup}``,
* a list of any of the above.

OmegaConf containers are converted to plain python first.
"""
from __future__ import annotations

import glob
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from medpipe.paths import not_regular

from .errors import DataError

DEDUP_MODES = ("none", "exact", "near")


@dataclass
class SourceSpec:
    """One data source.

    path      file, directory or glob (relative paths: base_dir, then cwd, then bundled samples)
    format    a name from ``FORMATS`` or ``auto`` (detected from extension + first record's keys)
    columns   ``{name_in_file: name_in_format}`` renames applied before reading the format
    split     for a directory/glob: keep files whose name contains it (``train``, ``dev``, ``val``)
    limit     read at most this many records (the first ones, before validation drops)
    weight    sampling proportion of this source in the mixed set (see ``mix.mix_sources``)
    task      fills the records' ``task`` (default: the mcq format name; PromptCBLUE: task_dataset)
    cop_base  MedMCQA ``cop`` numbering: 1 (original JSON files, 1-4: the default for .json/.jsonl)
              or 0 (the Hub's parquet copy, 0-3). Required for parquet: never guessed.
    heldout   fraction of this source carved out as held-out (duplicate clusters never straddle)
    dedup     ``none`` | ``exact`` (normalised text hash) | ``near`` (exact + MinHash LSH)
    max_record_bytes  the longest record (physical line) read, in bytes (default 16 MiB)
    ids       keep only records whose id is listed: a list, or a file (a JSON list, a JSON object
              whose keys are the ids such as PubMedQA's test_ground_truth.json, or one id a line)
    """

    path: str
    format: str = "auto"
    columns: dict | None = None
    split: str | None = None
    limit: int | None = None
    weight: float | None = None  # None: natural proportions (unless another source sets a weight)
    task: str | None = None
    cop_base: int | None = None
    heldout: float = 0.0
    dedup: str = "none"
    ids: Any = None
    # one record (a physical line) longer than this is refused with its file:line before it is
    # parsed or tokenised (None: readers.MAX_RECORD_BYTES); hashed only when set
    max_record_bytes: int | None = None
    # where the spec came from (recipe / conf file) for error messages; not part of the hash
    origin: str | None = field(default=None, compare=False, repr=False)
    # where the set is published (conf/data/public.yaml): named when its file is missing; not hashed
    published: str | None = field(default=None, compare=False, repr=False)

    def options(self) -> dict:
        """Spec options that change the output (for fingerprints)."""
        d = asdict(self)
        d.pop("origin", None)
        d.pop("published", None)
        if d["max_record_bytes"] is None:
            d.pop("max_record_bytes")   # keeps the keys of data hashed before the option existed
        return d


ALLOWED_KEYS = tuple(f.name for f in fields(SourceSpec) if f.name != "origin")  # incl. published
_ALIASES = {"ratio": "weight", "data_files": "path", "file": "path"}


def _plain(obj: Any) -> Any:
    mod = type(obj).__module__
    if mod.startswith("omegaconf"):
        from omegaconf import OmegaConf
        return OmegaConf.to_container(obj, resolve=True)
    return obj


def _conf_data_dir() -> Path:
    here = Path(__file__).resolve().parent.parent.parent  # repo root in the editable layout
    try:
        import medpipe.conf as _c  # noqa: WPS433
        return Path(_c.__file__).resolve().parent / "data"
    except Exception:  # pragma: no cover
        return here / "conf" / "data"


def _samples_dir() -> Path | None:
    try:
        import medpipe.samples as _s
        return Path(_s.__file__).resolve().parent
    except Exception:  # pragma: no cover
        return None


def _looks_like_name(s: str) -> bool:
    return bool(s) and "/" not in s and os.sep not in s and "." not in s and "*" not in s


def resolve_path(p: str, base_dir: str | os.PathLike | None = None) -> str:
    """Resolve a (possibly relative) path: base_dir, then cwd, then the bundled samples dir."""
    p = os.path.expanduser(str(p))
    if os.path.isabs(p):
        return p
    cands = []
    if base_dir is not None:
        cands.append(Path(base_dir) / p)
    cands.append(Path.cwd() / p)
    sd = _samples_dir()
    if sd is not None:
        rel = p[len("samples/"):] if p.startswith("samples/") else p
        cands.append(sd / rel)
    for c in cands:
        if c.exists() or glob.has_magic(str(c)) and glob.glob(str(c)):
            return str(c)
    return str(cands[0])


def _from_dict(d: dict, base_dir, origin: str | None) -> SourceSpec:
    d = dict(d)
    for a, k in _ALIASES.items():
        if a in d and k not in d:
            d[k] = d.pop(a)
    unknown = [k for k in d if k not in ALLOWED_KEYS]
    where = origin or "data"
    if unknown:
        raise DataError(f"unknown source key(s) {unknown}; allowed: {list(ALLOWED_KEYS)}",
                        where, None, str(unknown[0]), reason="unknown_key")
    if "path" not in d or d["path"] in (None, ""):
        raise DataError("a source needs a 'path'", where, None, "path", reason="missing")
    from .formats import FORMATS, FORMAT_ALIASES
    fmt = str(d.get("format") or "auto")
    fmt = FORMAT_ALIASES.get(fmt, fmt)
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; one of: auto, {', '.join(sorted(FORMATS))}",
                        where, None, "format", reason="unknown_format")
    d["format"] = fmt
    cols = d.get("columns")
    if cols is not None and not isinstance(cols, dict):
        raise DataError("'columns' must map file field names to format field names",
                        where, None, "columns", reason="type")
    dd = str(d.get("dedup") or "none")
    if dd in ("false", "False", "0"):
        dd = "none"
    if dd not in DEDUP_MODES:
        raise DataError(f"dedup must be one of {DEDUP_MODES}", where, None, "dedup", reason="type")
    d["dedup"] = dd
    cb = d.get("cop_base")
    if cb is not None and int(cb) not in (0, 1):
        raise DataError("cop_base must be 1 (original MedMCQA JSON, cop 1-4) or 0 (Hub parquet, "
                        "cop 0-3)", where, None, "cop_base", reason="type")
    w = _number(d, "weight", float, where)
    h = _number(d, "heldout", float, where) or 0.0
    lim = _number(d, "limit", int, where)
    cap = _number(d, "max_record_bytes", int, where)
    if cap is not None and cap < 1:
        raise DataError(f"max_record_bytes must be >= 1, got {cap}", where, None, "max_record_bytes",
                        reason="type")
    if lim is not None and lim < 1:
        raise DataError(f"limit must be >= 1 (how many records to read), got {lim}", where, None,
                        "limit", reason="type")
    ids = d.get("ids")
    if ids is not None and not isinstance(ids, (str, list, tuple)):
        raise DataError("ids must be a list of ids or a file of them", where, None, "ids",
                        reason="type")
    if isinstance(ids, str):
        ids = resolve_path(ids, base_dir)
    if w is not None and w < 0:
        raise DataError("weight must be >= 0", where, None, "weight", reason="type")
    if not 0.0 <= h < 1.0:
        raise DataError("heldout must be a fraction in [0, 1)", where, None, "heldout",
                        reason="type")
    return SourceSpec(path=resolve_path(d["path"], base_dir), format=fmt, columns=cols,
                      max_record_bytes=cap,
                      split=d.get("split"), limit=lim, weight=w, task=d.get("task"),
                      cop_base=None if cb is None else int(cb), heldout=h, dedup=dd,
                      ids=list(ids) if isinstance(ids, tuple) else ids, origin=origin,
                      published=None if d.get("published") is None else str(d["published"]))


def _number(d: dict, key: str, kind: type, where: str):
    """d[key] as int/float (None stays None); a wrong type names this one key."""
    v = d.get(key)
    if v is None:
        return None
    try:
        if isinstance(v, bool) or kind is int and isinstance(v, float) and not v.is_integer():
            raise ValueError
        return kind(v)
    except (TypeError, ValueError):
        raise DataError(f"expected {'an integer' if kind is int else 'a number'}, got {v!r}", where,
                        None, key, reason="type") from None


def _load_named(name: str) -> tuple[Any, str]:
    p = _conf_data_dir() / f"{name}.yaml"
    if not p.exists():
        return None, str(p)
    import yaml
    with open(p, encoding="utf-8") as f:
        obj = yaml.safe_load(f)
    if isinstance(obj, dict) and "sources" in obj:
        obj = obj["sources"]
    return obj, str(p)


def parse_spec(spec: Any, base_dir: str | os.PathLike | None = None,
               _origin: str | None = None, _depth: int = 0) -> list[SourceSpec]:
    """Turn a stage's ``data`` value into a list of :class:`SourceSpec`."""
    spec = _plain(spec)
    if _depth > 5:
        raise DataError("data spec nests too deeply (a conf/data name refers to itself?)",
                        _origin, None, None)
    if isinstance(spec, SourceSpec):
        return [spec]
    if isinstance(spec, (str, os.PathLike)):
        s = str(spec)
        if _looks_like_name(s) and not os.path.exists(resolve_path(s, base_dir)):
            obj, where = _load_named(s)
            if obj is None:
                raise DataError(f"no such file, and no data config named {s!r} ({where})",
                                _origin or "data", None, "path", reason="missing")
            return parse_spec(obj, base_dir=base_dir, _origin=where, _depth=_depth + 1)
        return [_from_dict({"path": s}, base_dir, _origin)]
    if isinstance(spec, dict):
        return [_from_dict(spec, base_dir, _origin)]
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise DataError("empty list of data sources", _origin or "data", None, None,
                            reason="empty")
        out: list[SourceSpec] = []
        for item in spec:
            out.extend(parse_spec(item, base_dir=base_dir, _origin=_origin, _depth=_depth + 1))
        return out
    raise DataError(f"a data spec is a path, a conf/data name, a source dict or a list of them; "
                    f"got {type(spec).__name__}", _origin or "data", None, None, reason="type")


def load_ids(src: SourceSpec) -> set[str] | None:
    """The ids of ``src.ids`` as strings (None when the source keeps every record)."""
    v = src.ids
    if v is None:
        return None
    if isinstance(v, list):
        return {str(x).strip() for x in v}
    if not os.path.isfile(v):
        raise DataError("ids file not found", v, None, "ids", reason="missing_file")
    with open(v, encoding="utf-8-sig") as f:
        text = f.read()
    if v.lower().endswith(".json"):
        import json
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg}", v, e.lineno, "ids", reason="invalid_json") from None
        if isinstance(obj, dict):
            return {str(k).strip() for k in obj}
        if isinstance(obj, list):
            return {str(x).strip() for x in obj}
        raise DataError("expected a JSON list of ids or an object keyed by id", v, None, "ids",
                        reason="type")
    return {ln.strip() for ln in text.splitlines() if ln.strip()}


def _not_found(src: SourceSpec) -> str:
    return "file not found" + (f" (published: {src.published})" if src.published else "")


def expand_paths(src: SourceSpec) -> list[str]:
    """Files of a source: the file itself, or a directory's / glob's files filtered by split."""
    p = src.path
    if os.path.isdir(p):
        files = sorted(str(x) for x in Path(p).iterdir() if x.is_file()
                       and not x.name.startswith((".", "_")))
    elif glob.has_magic(p):
        files = sorted(f for f in glob.glob(p) if not os.path.isdir(f))
    elif os.path.exists(p):
        files = [p]
    elif os.path.islink(p):
        try:
            os.stat(p)
        except OSError as e:
            import errno
            why = "symlink loop" if e.errno == errno.ELOOP else \
                f"broken symlink (to {os.readlink(p)})"
            raise DataError(why, p, None, None, reason="missing_file") from None
        raise DataError(_not_found(src), p, None, None, reason="missing_file")
    else:
        raise DataError(_not_found(src), p, None, None, reason="missing_file")
    for f in files:
        why = not_regular(f)
        if why:
            raise DataError(why, f, None, None, reason="not_regular")
    if len(files) == 1 and files[0] == p:
        return files
    if src.split:
        files = [f for f in files if src.split in Path(f).stem]
    if not files:
        raise DataError(f"no data files{' for split ' + repr(src.split) if src.split else ''}"
                        + (f" (published: {src.published})" if src.published else ""),
                        p, None, None, reason="missing_file")
    return files
