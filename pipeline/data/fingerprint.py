"""Stable fingerprint of a stage's data (file contents + spec options) for skip/resume."""
from __future__ import annotations

import hashlib
import json
import os

from medpipe.paths import not_regular

from .errors import DataError
from .sources import expand_paths, parse_spec

BIG = 256 * 1024 * 1024
EDGE = 8 * 1024 * 1024
CHUNK = 1024 * 1024


def file_digest(path: str) -> str:
    """sha256 of the file, streamed; files over 256 MB: size + mtime + first/last 8 MB."""
    why = not_regular(path)
    if why:   # a FIFO or /dev/zero would be hashed forever
        raise DataError(why, path, None, None, reason="not_regular")
    h = hashlib.sha256()
    st = os.stat(path)
    with open(path, "rb") as f:
        if st.st_size > BIG:
            h.update(f"big:{st.st_size}:{st.st_mtime_ns}".encode())
            h.update(f.read(EDGE))
            f.seek(st.st_size - EDGE)
            h.update(f.read(EDGE))
        else:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                h.update(chunk)
    return h.hexdigest()


def fingerprint(spec, base_dir=None, **options) -> str:
    """sha256 hex over every source's files (name + content digest) and its spec options.

    ``options`` (e.g. want, seed, max_length) are mixed in too, so the engine can hash the
    loader arguments that change the output."""
    h = hashlib.sha256(b"medpipe-data-v1\0")
    for src in parse_spec(spec, base_dir=base_dir):
        opts = src.options()
        opts.pop("path")
        h.update(json.dumps(opts, sort_keys=True, default=str).encode())
        if isinstance(src.ids, str) and os.path.isfile(src.ids):
            h.update(b"ids\0" + file_digest(src.ids).encode())
        for p in expand_paths(src):
            h.update(os.path.basename(p).encode() + b"\0")
            h.update(file_digest(p).encode())
    if options:
        h.update(json.dumps(options, sort_keys=True, default=str).encode())
    return h.hexdigest()
