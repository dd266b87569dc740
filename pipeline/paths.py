"""Where medpipe keeps what it builds once and shares between runs (tiny models, converted
checkpoints, tokenised data, knowledge indexes): $MEDPIPE_CACHE, default ~/.cache/medpipe."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("MEDPIPE_CACHE", Path.home() / ".cache" / "medpipe")).expanduser()
