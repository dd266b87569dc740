"""A training stage's history and its resume point, in one place.

`log_history.jsonl` in the stage directory: one JSON line per trainer log (`step` first, then what
the trainer logged: loss, eval_loss, learning_rate, ...). The progress callback `append`s (rank 0),
the report `read`s, and the training loop, once it knows the checkpoint it resumes from
(`last_complete_checkpoint`), `trim`s the lines an abandoned attempt logged past it — once, before
training — so a resumed stage's history is line for line that of an uninterrupted run.

Light: json and the standard library only (the engine and the report import it).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from .artifact import write_text_atomic

FILE = "log_history.jsonl"


def append(stage_dir: Path, step: int, logs: dict) -> None:
    with open(Path(stage_dir) / FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, **logs}) + "\n")


def read(stage_dir: Path) -> list[dict]:
    """Every whole line; one torn by a kill (or not a JSON object) is left out."""
    path = Path(stage_dir) / FILE
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []
    return [row for row in map(_row, lines) if row is not None]


def trim(stage_dir: Path, step: int) -> int:
    """Keep the lines logged at or before `step` (the checkpoint this attempt resumes from; 0: none,
    the history starts again), drop those an abandoned attempt logged after it and torn ones.
    Returns how many lines are kept."""
    path = Path(stage_dir) / FILE
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = [line for line, row in zip(lines, map(_row, lines))
            if row is not None and isinstance(row.get("step"), int) and 0 < step and row["step"] <= step]
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(x + "\n" for x in kept))
    return len(kept)


def mean_loss(stage_dir: Path) -> float | None:
    """The mean logged training loss of the whole stage, all attempts (after `trim`); None: none logged."""
    losses = [float(r["loss"]) for r in read(stage_dir)
              if isinstance(r.get("loss"), (int, float)) and not math.isnan(r["loss"])]
    return sum(losses) / len(losses) if losses else None


def _row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


# --- the resume point ----------------------------------------------------------------------------
def checkpoint_step(checkpoint: str | Path) -> int:
    """The step of a `checkpoint-N` directory (0 for another name)."""
    tail = Path(checkpoint).name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def last_complete_checkpoint(ckpt_dir: Path, say: Callable[[str], Any] | None = None) -> str | None:
    """The newest checkpoint that loads: its trainer state parses and every weights/optimizer file
    reads back to its end (`checkpoint_problem`), so a run killed while saving, or a checkpoint torn
    later, resumes from an older one instead of crashing in the trainer; `say` is told which
    checkpoints were skipped and why."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    found = [p for p in ckpt_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    for p in sorted(found, key=checkpoint_step, reverse=True):
        problem = checkpoint_problem(p)
        if problem is None:
            return str(p)
        if say is not None:
            say(f"skipping {p.name}: {problem}")
    return None


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a checkpoint cannot be resumed from ("FILE: why"), or None. Reads headers only: a
    safetensors file's header and the sizes it declares, a torch file's zip directory."""
    import struct
    import zipfile

    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        if not isinstance(state, dict) or "global_step" not in state:
            return "trainer_state.json: no global_step"
    except FileNotFoundError:
        return "trainer_state.json: missing (the save did not finish)"
    except (OSError, ValueError) as e:
        return f"trainer_state.json: unreadable ({e})"
    for f in sorted(ckpt.iterdir()):
        try:
            if f.suffix == ".safetensors":
                with open(f, "rb") as fh:
                    (n,) = struct.unpack("<Q", fh.read(8))
                    header = json.loads(fh.read(n))
                end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
                if f.stat().st_size < 8 + n + end:
                    return f"{f.name}: truncated ({f.stat().st_size} bytes, its header needs {8 + n + end})"
            elif f.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(f):
                    pass
        except (OSError, ValueError, KeyError, TypeError, struct.error, zipfile.BadZipFile) as e:
            return f"{f.name}: unreadable ({type(e).__name__}: {e})"
    return None
