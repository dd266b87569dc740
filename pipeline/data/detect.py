"""Format detection from the extension and the first record's keys (``format: auto``)."""
from __future__ import annotations

import re
from pathlib import Path

from .errors import DataError
from .formats import FORMATS, SHAPES
from .readers import HEADERLESS, container_of, first_record, looks_like_paragraphs

# MMLU's release names its files <subject>_<split>.csv (data/test/anatomy_test.csv)
_MMLU_NAME = re.compile(r"_(test|dev|val)\.csv$", re.IGNORECASE)


def detect_from_keys(keys: set, path: str, loc=None) -> tuple[str, str]:
    cands = [s for s in SHAPES if s.keys <= keys]
    # keep the most specific shapes: drop one whose key set is a strict subset of another's
    best = [s for s in cands if not any(s.keys < o.keys for o in cands)]
    names = sorted({s.name for s in best})
    shown = sorted(keys)[:12]
    if not names:
        raise DataError(f"can't tell the format from the keys {shown}; set format: (one of "
                        f"{', '.join(sorted(FORMATS))}) and, if the names differ, columns:",
                        path, loc, "format", reason="unknown_format")
    if len(names) > 1:
        raise DataError(f"ambiguous format: keys {shown} fit {names}; set format: explicitly",
                        path, loc, "format", reason="ambiguous_format")
    s = next(x for x in best if x.name == names[0])
    return names[0], f"keys {sorted(s.keys)} present"


def detect_format(path: str, columns: dict | None = None) -> tuple[str, str]:
    """Return ``(format, reason)``. Raises DataError when the file is empty, the keys match
    nothing, or they match several formats (then ``format:`` must be given)."""
    kind = container_of(path)
    if kind == "txt":
        if looks_like_paragraphs(path):
            return "paragraphs", "extension .txt with blank-line-separated paragraphs: one document each"
        return "text", "extension .txt: one document per non-empty line"
    loc, rec, file_keys = first_record(path)
    if rec is None:
        raise DataError("no records (empty file)", path, None, None, reason="empty_dataset")
    if file_keys is not None and HEADERLESS in file_keys:
        if _MMLU_NAME.search(Path(path).name):
            return "mmlu", "header-less csv file (rows question,A,B,C,D,<letter>) named <subject>_<split>.csv: MMLU"
        raise DataError("a header-less 6-column CSV ending in an answer letter (MMLU's shape?), but its name is not "
                        "<subject>_test/_dev/_val.csv; set format: mmlu (or give the CSV a header)",
                        path, None, "format", reason="ambiguous_format")
    keys = set(file_keys) if file_keys is not None else set(rec)
    keys.discard("_key")
    if columns:
        keys = {columns.get(k, k) for k in keys}
    fmt, why = detect_from_keys(keys, path, loc)
    return fmt, f"{kind} file, {why}"
