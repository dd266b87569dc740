"""medpipe.data — read the public medical datasets as they are, validate every record
before training, mix, dedup, split and pack.

Public API (see docs in each module):
    DataError, SourceSpec, parse_spec, load_records, LoadResult, SourceReport, validate,
    detect_format, fingerprint, pack_texts, check_overlap, OverlapReport, FORMATS, WANTS

Importing this package is light (no torch/transformers/datasets); heavy libraries are imported
inside the functions that need them.
"""
from .detect import detect_format
from .errors import DataError
from .fingerprint import fingerprint
from .formats import FORMATS
from .overlap import OverlapReport, check_overlap
from .pack import pack_texts
from .sources import SourceSpec, parse_spec
from .validate import WANTS, LoadResult, SourceReport, load_records, summary_table, validate

__all__ = ["DataError", "SourceSpec", "parse_spec", "load_records", "LoadResult",
           "SourceReport", "validate", "summary_table", "detect_format", "fingerprint",
           "pack_texts", "check_overlap", "OverlapReport", "FORMATS", "WANTS"]
