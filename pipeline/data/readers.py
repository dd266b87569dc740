"""Container readers: yield ``(line, raw)`` pairs with the right location for error messages.

* JSONL: physical line number (blank lines skipped); a bad line raises/counts ``invalid_json``.
* JSON array: ``"[index]"``; JSON object keyed by id (PubMedQA ori_pqal.json): ``"[id]"``;
  a one-key object wrapping a list (``{"data": [...]}``): ``"[index]"``.
* CSV/TSV: the record's *starting* line in the file (header = line 1), correct across quoted
  fields with embedded newlines (CMExam Options). MMLU's release has no header: a .csv whose first
  row is `question,A,B,C,D,<letter A-D>` is read with MMLU_COLUMNS as its header (records from
  line 1) and `HEADERLESS` in `file_keys` (detect.py decides whether that means format mmlu).
* parquet: ``"[row]"`` (0-based).
* txt: one record per non-empty line, ``{"text": line}``.

All text is read as UTF-8 with or without a BOM.
"""
from __future__ import annotations

import csv
import json
import sys
from typing import Iterator

from medpipe.paths import not_regular

from .errors import DataError

JSON_EXT = (".json", ".jsonl", ".ndjson")
CSV_EXT = (".csv", ".tsv")
PARQUET_EXT = (".parquet", ".pq")
TXT_EXT = (".txt", ".text", ".md")

WRAPPER_KEYS = ("data", "train", "validation", "test", "dev", "examples", "instances", "rows",
                "records", "items")

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

# the longest physical line read (a record of line-based files); per source: max_record_bytes
MAX_RECORD_BYTES = 16 << 20

# hendrycks/test data/{dev,val,test}/<subject>_<split>.csv: rows question,A,B,C,D,answer, no header
MMLU_COLUMNS = ("question", "A", "B", "C", "D", "answer")
HEADERLESS = "\0headerless"


def is_mmlu_row(row: list[str]) -> bool:
    """A data row in MMLU's shape, not a header: 6 cells, the last one answer letter. (C-Eval's
    test header `id,question,A,B,C,D` also ends in a letter: its option columns are named A-D.)"""
    if len(row) != 6 or row[5].strip() not in ("A", "B", "C", "D"):
        return False
    cells = [c.strip() for c in row]
    return cells[1:5] != ["A", "B", "C", "D"] and cells[2:6] != ["A", "B", "C", "D"]


def container_of(path: str) -> str:
    low = path.lower()
    for ext, kind in ((JSON_EXT, "json"), (CSV_EXT, "csv"), (PARQUET_EXT, "parquet"),
                      (TXT_EXT, "txt")):
        if low.endswith(ext):
            return kind
    raise DataError("unknown file type (expected .jsonl/.json/.csv/.tsv/.parquet/.txt)",
                    path, None, None, reason="unknown_format")


class DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise DuplicateKey(k)
            seen.add(k)
    return d


def _duplicate(path, line, key) -> DataError:
    return DataError("duplicate key in one object (the last value would silently win)", path, line, key,
                     reason="duplicate_key")


class RawReader:
    """Iterates one file. ``errors`` collects DataErrors that were skippable (bad JSONL lines),
    only used when ``on_error='skip'``; otherwise they raise."""

    def __init__(self, path: str, on_error: str = "fail", paragraphs: bool = False,
                 max_record_bytes: int | None = None):
        why = not_regular(path)
        if why:   # a FIFO or a device would block or never end
            raise DataError(why, path, None, None, reason="not_regular")
        self.path = path
        self.max_record_bytes = max_record_bytes or MAX_RECORD_BYTES
        self.paragraphs = paragraphs  # txt: one document per blank-line-separated paragraph
        self.on_error = on_error
        self.kind = container_of(path)
        self.file_keys: set | None = None   # CSV header / parquet schema (known for all rows)
        self.skipped: list[DataError] = []
        self.bytes_read = 0          # for progress on long files (line-read containers)

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
            first = f.readline(self.max_record_bytes + 1)
            rest = f.read(4096).strip()
        if len(first) > self.max_record_bytes:
            return "jsonl"   # one over-long line: the line reader refuses it with its line number
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
                obj = json.load(f, object_pairs_hook=_no_duplicates)
        except DuplicateKey as e:
            raise _duplicate(self.path, _locate_duplicate(self.path), e.key) from None
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", self.path, e.lineno,
                            None, reason="invalid_json") from None
        except UnicodeDecodeError as e:
            raise DataError(f"not UTF-8: {e.reason}", self.path, None, None,
                            reason="encoding") from None
        yield from _walk_document(obj, self.path)

    def _lines(self):
        """(physical line number, decoded line): the same line-by-line decoding as CSV files get."""
        with open(self.path, "rb") as f:
            yield from enumerate(self._decoded(f), 1)

    def _iter_jsonl(self):
        loads = json.loads
        for n, line in self._lines():
            if not line.strip():
                continue
            try:
                rec = loads(line, object_pairs_hook=_no_duplicates)
            except DuplicateKey as e:
                self._bad(_duplicate(self.path, n, e.key))
                continue
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
    def _decoded(self, f):
        """Physical lines decoded one by one, so a non-UTF-8 byte (a GBK/GB18030 export) or a NUL
        byte is reported on the line it is on, not where a decoding buffer happened to end."""
        cap = self.max_record_bytes
        for n, raw in enumerate(iter(lambda: f.readline(cap + 1), b""), 1):
            if len(raw) > cap:
                # one huge line would go to the parser and the tokenizer whole (a 200 MB line
                # aborts tokenisation at ~9 GB): refused here, before it is decoded
                raise DataError(f"record longer than max_record_bytes={cap} bytes (a file without line "
                                f"breaks? raise it with the source option max_record_bytes)", self.path, n,
                                None, reason="too_long")
            self.bytes_read += len(raw)
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"not UTF-8: {e.reason} at byte {e.start} (a GBK/GB18030 file? re-save it as "
                                f"UTF-8)", self.path, n, None, reason="encoding") from None
            if "\x00" in text:
                raise DataError("NUL byte (a binary or UTF-16 file?)", self.path, n, None, reason="encoding")
            yield text

    def _iter_csv(self):
        delim = "\t" if self.path.lower().endswith(".tsv") else ","
        with open(self.path, "rb") as f:
            reader = csv.reader(self._decoded(f), delimiter=delim)
            try:
                header = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError as e:
                raise DataError(f"not UTF-8: {e.reason}", self.path, 1, None,
                                reason="encoding") from None
            first = None
            if delim == "," and is_mmlu_row(header):
                first, header = header, list(MMLU_COLUMNS)
                self.file_keys = set(header) | {HEADERLESS}
            else:
                header = [h.strip() for h in header]
                self.file_keys = set(header)
            nh = len(header)
            prev = reader.line_num
            if first is not None:
                yield 1, dict(zip(header, first))
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
        if self.paragraphs:
            yield from self._iter_paragraphs()
            return
        for n, line in self._lines():
            t = line.rstrip("\r\n")
            if t.strip():
                yield n, {"text": t}


    def _iter_paragraphs(self):
        """Hard-wrapped text: a document is a run of non-blank lines; its place is its first line."""
        start, buf = None, []
        for n, line in self._lines():
            t = line.rstrip("\r\n")
            if t.strip():
                if start is None:
                    start = n
                buf.append(t)
            elif buf:
                yield start, {"text": "\n".join(buf)}
                start, buf = None, []
        if buf:
            yield start, {"text": "\n".join(buf)}


def _locate_duplicate(path: str):
    """The element ("[i]") of a JSON array that holds an object with a duplicate key (slow path,
    only after one was found)."""
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    dec = json.JSONDecoder(object_pairs_hook=_no_duplicates)
    i = len(text) - len(text.lstrip())
    if not text.startswith("[", i):
        return None
    i, k = i + 1, 0
    while i < len(text):
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return None
        try:
            _, i = dec.raw_decode(text, i)
        except DuplicateKey:
            return f"[{k}]"
        except json.JSONDecodeError:
            return None
        k += 1
    return None


def looks_like_paragraphs(path: str, sample: int = 1 << 18) -> bool:
    """A .txt whose documents are blank-line-separated paragraphs of several lines each (hard-
    wrapped text) rather than one document per line."""
    with open(path, "rb") as f:
        head = f.read(sample).decode("utf-8", "replace").replace("\r\n", "\n")
    blocks = [b for b in head.split("\n\n") if b.strip()]
    if len(blocks) < 2:
        return False
    lines = sum(len([x for x in b.split("\n") if x.strip()]) for b in blocks)
    return lines / len(blocks) >= 2


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
