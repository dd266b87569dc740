"""Where medpipe keeps what it builds once and shares between runs (tiny models, converted
checkpoints, tokenised data, knowledge indexes): $MEDPIPE_CACHE, default ~/.cache/medpipe."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("MEDPIPE_CACHE", Path.home() / ".cache" / "medpipe")).expanduser()


def not_regular(path: str | os.PathLike) -> str | None:
    """Why medpipe must not read ``path`` as a file (a FIFO, a device, a socket, a directory would
    block or never end: /dev/zero hashes forever), or None for a regular file (or a missing one:
    the caller names that itself). Checked by type, before the first byte is read."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    return f"{kind}, not a regular file"
