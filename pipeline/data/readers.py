"""Container readers: yield ``(line, raw)`` pairs with the right location for error messages.

* JSONL: physical line number (blank lines skipped); a bad line raises/counts ``invalid_json``.
* JSON array: ``"[index]"``; JSON object keyed by id (PubMedQA ori_pqal.json): ``"[id]"``;
  a one-key object wrapping a list (``{"data": [...]}``): ``"[index]"``.
* CSV/TSV: the record's *starting* line in the file (header = line 1), correct across quoted
  fields with embedded newlines (CMExam Options).
* parquet: ``"[row]"`` (0-based).
* txt: one record per non-empty line, ``{"text": line}``.

All text is read as UTF-8 with or without a BOM.
"""
from __future__ import annotations

import csv
import json
import os
import sys
from typing import Iterator

from .errors import DataError

JSON_EXT = (".json", ".jsonl", ".ndjson")
CSV_EXT = (".csv", ".tsv")
PARQUET_EXT = (".parquet", ".pq")
TXT_EXT = (".txt", ".text", ".md")

WRAPPER_KEYS = ("data", "train", "validation", "test", "dev", "examples", "instances", "rows",
                "records", "items")

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def container_of(path: str) -> str:
    low = path.lower()
    for ext, kind in ((JSON_EXT, "json"), (CSV_EXT, "csv"), (PARQUET_EXT, "parquet"),
                      (TXT_EXT, "txt")):
        if low.endswith(ext):
            return kind
    raise DataError("unknown file type (expected .jsonl/.json/.csv/.tsv/.parquet/.txt)",
                    path, None, None, reason="unknown_format")


class RawReader:
    """Iterates one file. ``errors`` collects DataErrors that were skippable (bad JSONL lines),
    only used when ``on_error='skip'``; otherwise they raise."""

    def __init__(self, path: str, on_error: str = "fail"):
        self.path = path
        self.on_error = on_error
        self.kind = container_of(path)
        self.file_keys: set | None = None   # CSV header / parquet schema (known for all rows)
        self.skipped: list[DataError] = []

    def _bad(self, err: DataError):
        if self.on_error == "skip":
            self.skipped.append(err)
        else:
            raise err

    def __iter__(self) -> Iterator[tuple[object, object]]:
        return getattr(self, "_iter_" + self.kind)()

    # ---- JSON / JSONL -------------------------------------------------------------------
    def _json_layout(self) -> str:
        try:
            return self._sniff_json()
        except UnicodeDecodeError:
            return "jsonl"   # the line reader names the line with the bad byte

    def _sniff_json(self) -> str:
        with open(self.path, encoding="utf-8-sig", errors="strict") as f:
            head = f.read(4096).lstrip()
            if not head:
                return "empty"
            if head[0] == "[":
                return "array"
            if head[0] != "{":
                return "jsonl"  # let the line reader report the first bad line
            f.seek(0)
            first = f.readline()
            rest = f.read(4096).strip()
        try:
            obj = json.loads(first)
        except json.JSONDecodeError:
            # a pretty-printed JSON document, or a JSONL file whose first line is broken
            return "document" if first.strip() in ("{", "{\n") or not first.strip().endswith("}") \
                else "jsonl"
        if not rest and isinstance(obj, dict) and _is_keyed_or_wrapped(obj):
            return "document"
        return "jsonl"

    def _iter_json(self):
        layout = self._json_layout()
        if layout == "empty":
            return
        if layout == "jsonl":
            yield from self._iter_jsonl()
            return
        try:
            with open(self.path, encoding="utf-8-sig") as f:
                obj = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", self.path, e.lineno,
                            None, reason="invalid_json") from None
        except UnicodeDecodeError as e:
            raise DataError(f"not UTF-8: {e.reason}", self.path, None, None,
                            reason="encoding") from None
        yield from _walk_document(obj, self.path)

    def _lines(self):
        """(physical line number, decoded line) — read as bytes and decoded line by line so a
        non-UTF-8 byte is reported on its own line; a leading BOM is dropped."""
        with open(self.path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                try:
                    yield n, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"not UTF-8: {e.reason} at byte {e.start}", self.path, n,
                                    None, reason="encoding") from None

    def _iter_jsonl(self):
        loads = json.loads
        for n, line in self._lines():
            if not line.strip():
                continue
            try:
                rec = loads(line)
            except json.JSONDecodeError as e:
                self._bad(DataError(f"invalid JSON: {e.msg} (column {e.colno})", self.path, n,
                                    None, reason="invalid_json"))
                continue
            if not isinstance(rec, dict):
                self._bad(DataError(f"expected a JSON object, got {type(rec).__name__}",
                                    self.path, n, None, reason="wrong_type"))
                continue
            yield n, rec

    # ---- CSV ----------------------------------------------------------------------------
    def _iter_csv(self):
        delim = "\t" if self.path.lower().endswith(".tsv") else ","
        with open(self.path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=delim)
            try:
                header = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError as e:
                raise DataError(f"not UTF-8: {e.reason}", self.path, 1, None,
                                reason="encoding") from None
            header = [h.strip() for h in header]
            self.file_keys = set(header)
            nh = len(header)
            prev = reader.line_num
            while True:
                start = prev + 1
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except UnicodeDecodeError as e:
                    raise DataError(f"not UTF-8: {e.reason}", self.path, start, None,
                                    reason="encoding") from None
                except csv.Error as e:
                    raise DataError(f"CSV syntax: {e}", self.path, start, None,
                                    reason="invalid_csv") from None
                prev = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != nh:
                    self._bad(DataError(f"row has {len(row)} fields, header has {nh}",
                                        self.path, start, None, reason="bad_row"))
                    continue
                yield start, dict(zip(header, row))

    # ---- parquet ------------------------------------------------------------------------
    def _iter_parquet(self):
        import pyarrow.parquet as pq
        try:
            pf = pq.ParquetFile(self.path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types
            raise DataError(f"not a readable parquet file: {e}", self.path, None, None,
                            reason="invalid_parquet") from None
        self.file_keys = set(pf.schema_arrow.names)
        i = 0
        for batch in pf.iter_batches(batch_size=8192):
            for rec in batch.to_pylist():
                yield f"[{i}]", rec
                i += 1

    # ---- txt ----------------------------------------------------------------------------
    def _iter_txt(self):
        self.file_keys = {"text"}
        for n, line in self._lines():
            t = line.rstrip("\r\n")
            if t.strip():
                yield n, {"text": t}


def _is_keyed_or_wrapped(obj: dict) -> bool:
    if not obj:
        return True
    vals = list(obj.values())
    if all(isinstance(v, dict) for v in vals):
        return True
    return len(obj) == 1 and next(iter(obj)) in WRAPPER_KEYS and isinstance(vals[0], list)


def _walk_document(obj, path):
    if isinstance(obj, list):
        items = ((f"[{i}]", r) for i, r in enumerate(obj))
    elif isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in WRAPPER_KEYS \
            and isinstance(next(iter(obj.values())), list):
        k = next(iter(obj))
        items = ((f"[{k}][{i}]", r) for i, r in enumerate(obj[k]))
    elif isinstance(obj, dict) and obj and all(isinstance(v, dict) for v in obj.values()):
        items = ((f"[{k}]", dict(v, **({"_key": k}))) for k, v in obj.items())
    elif isinstance(obj, dict):
        items = iter([("[0]", obj)])
    else:
        raise DataError(f"expected a JSON array or object, got {type(obj).__name__}", path, 1,
                        None, reason="wrong_type")
    for loc, rec in items:
        if not isinstance(rec, dict):
            raise DataError(f"expected a JSON object, got {type(rec).__name__}", path, loc, None,
                            reason="wrong_type")
        yield loc, rec


def first_record(path: str) -> tuple[object, dict | None, set | None]:
    """(loc, first raw record or None, file-level keys if known) — for format detection."""
    r = RawReader(path, on_error="fail")
    for loc, rec in r:
        return loc, rec, r.file_keys
    return None, None, r.file_keys


def file_size(path: str) -> int:
    return os.path.getsize(path)
