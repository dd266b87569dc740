"""The state of store entries and run dirs, as the engine and the commands read it: a stage's
status.json (done only when its artifact and files check out; torn JSON is `broken`, naming the
file), the per-entry trainer lock, time summed over attempts, the space reserve that lets a
`failed` status be written on a full disk, OS errors as one line, and run.json."""
from __future__ import annotations

import fcntl
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .artifact import Artifact, ArtifactError, check_files, write_json_atomic
from .errors import MedpipeError
from .paths import not_regular

RUN_FILE = "run.json"
STATUS_FILE = "status.json"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_status(stage_dir: Path) -> dict:
    """The stage's state: done only when its artifact reads back and its files have the sizes it
    recorded; a torn status.json or artifact.json is `broken`, with `error` naming the file."""
    path = stage_dir / STATUS_FILE
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(status, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        status = {"state": "pending"}
    except (OSError, ValueError) as e:
        status = {"state": "broken", "error": f"{path}: not a readable status ({e})"}
    if Artifact.exists(stage_dir):
        try:
            art = Artifact.load(stage_dir)
            problems = check_files(art, stage_dir)
        except ArtifactError as e:
            problems = [str(e)]
        if problems:
            status.update(state="broken", error=problems[0])
        else:
            status["state"] = "done"
    elif status.get("state") == "running" and not _alive(status.get("pid"), status.get("host")):
        status["state"] = "interrupted"
    return status


def _alive(pid: int | None, host: str | None) -> bool:
    if not pid:
        return False
    if host != socket.gethostname():
        return True  # another host: trust the file
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def write_status(stage_dir: Path, **fields: Any) -> None:
    current = {}
    try:
        current = json.loads((stage_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        pass
    current.update(fields)
    write_json_atomic(stage_dir / STATUS_FILE, current)


class StageLock:
    """One trainer per store entry: a second run training the same stage fails fast instead of
    corrupting the checkpoints."""

    def __init__(self, stage_dir: Path):
        self.path = stage_dir / ".lock"

    def __enter__(self) -> "StageLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise MedpipeError(f"{self.path.parent} is being trained by another medpipe process") from None
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


RESERVE_FILE = ".space-reserve"


def reserve_space(sdir: Path, size: int = 256 << 10) -> Path:
    """A small file deleted when the stage fails, so that on a full disk the `failed` status (and
    the message saying why) can still be written."""
    path = sdir / RESERVE_FILE
    with open(path, "wb") as f:
        f.write(b"\0" * size)
    return path


def earlier_attempts(sdir: Path, status: dict) -> list[float]:
    """Seconds of the stage's earlier attempts (status/report show their sum). An attempt killed
    with no chance to record its end counts until the last file it wrote in the entry."""
    attempts = [float(a) for a in status.get("attempts") or [] if isinstance(a, (int, float))]
    if status.get("state") == "interrupted" and status.get("ended") is None and status.get("started"):
        try:
            start = datetime.fromisoformat(status["started"]).timestamp()
        except (TypeError, ValueError):
            return attempts
        last = max((p.stat().st_mtime for p in sdir.rglob("*") if p.is_file()), default=start)
        attempts.append(max(0.0, last - start))
    return attempts


def os_error_message(stage: str, sdir: Path, error: BaseException) -> str | None:
    """One line for an operating-system error anywhere in the error's chain (a full disk under
    torch's or safetensors' own exception types too), or None when it is not one."""
    import errno
    import shutil

    try:
        free_bytes = shutil.disk_usage(sdir).free
        free = f"{free_bytes / 2**20:.1f} MiB free there"
    except OSError:
        free_bytes, free = None, "free space unknown"

    def no_space(where: Any) -> str:
        return (f"stage {stage}: no space left on the device writing {where} ({free}); free some space and "
                f"rerun the same command to resume from the last checkpoint")

    seen, e, write_failed = set(), error, False
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e)
        if (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in text:
            return no_space(getattr(e, "filename", None) or sdir)
        if isinstance(e, OSError) and e.errno is not None:
            where = f" {e.filename}" if getattr(e, "filename", None) else ""
            return f"stage {stage}: {e.strerror or text}:{where} (errno {errno.errorcode.get(e.errno, e.errno)})"
        write_failed = write_failed or any(m in text for m in WRITE_FAILURES)
        e = e.__cause__ or e.__context__
    if write_failed:  # torch.save on a full disk says only "iostream error" / "unexpected pos"
        if free_bytes is not None and free_bytes < LOW_SPACE:
            return no_space(sdir)
        return f"stage {stage}: writing under {sdir} failed ({str(error).splitlines()[0]}; {free})"
    return None


# What torch / safetensors raise (as RuntimeError, no errno) when a write fails, e.g. on a full disk
WRITE_FAILURES = ("iostream error", "unexpected pos", "PytorchStreamWriter failed", "file write failed")
LOW_SPACE = 64 << 20


def read_run_file(run_dir: Path) -> dict:
    path = Path(run_dir) / RUN_FILE
    why = not_regular(path)
    if why:
        raise MedpipeError(f"{path}: {why}")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MedpipeError(f"{run_dir} is not a medpipe run dir (no {RUN_FILE})") from None
    except (OSError, ValueError) as e:
        raise MedpipeError(f"{path}: not a readable run file ({e})") from None
    if not isinstance(info, dict) or not isinstance(info.get("stages"), list):
        raise MedpipeError(f"{path}: not a medpipe run file (no 'stages' list)")
    for s in info["stages"]:
        # the run dir's relative link NN-<stage> first: it still points at the entry when the run
        # dir was moved or copied together with its store (the recorded absolute path would not)
        linked = Path(run_dir) / str(s.get("link") or "")
        if s.get("link") and linked.is_symlink() and linked.exists():
            s["store_dir"] = str(linked.resolve())
    return info


def stage_table(run_dir: Path) -> list[dict]:
    """Per stage: state, elapsed (all attempts), artifact path (for `medpipe status`)."""
    info = read_run_file(run_dir)
    rows = []
    for s in info["stages"]:
        sdir = Path(s["store_dir"])
        st = read_status(sdir) if sdir.exists() else {"state": "pending"}
        rows.append({"stage": s["name"], "kind": s["kind"], "state": st.get("state", "pending"),
                     "elapsed": st.get("elapsed"), "started": st.get("started"), "attempts": len(st.get("attempts") or []),
                     "artifact": str(sdir / "artifact.json") if st.get("state") == "done" else "",
                     "error": st.get("error")})
    return rows


def unwritable(path: Path) -> str | None:
    """Why medpipe could not create files at `path` (a read-only mount or directory, a file in the
    way), or None. Tried for real in the nearest directory that exists: a mode check alone says yes
    to root on a read-only filesystem."""
    import tempfile

    p = Path(path)
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            return "no existing parent directory"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a directory"
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".medpipe-write-check-")
    except OSError as e:
        return f"{probe} is not writable ({e.strerror})"
    os.close(fd)
    os.unlink(name)
    return None


def check_places(cfg: Any) -> None:
    """run.dir (or run.root, where run dirs go) and the store are writable: checked by `validate`
    and before `run` writes anything (else a read-only store fails after the run dir was made and
    the first stage started)."""
    from .errors import ConfigError

    run = cfg.run
    places = [("run.dir", run.get("dir")) if run.get("dir") else ("run.root", run.get("root")),
              ("run.store", run.get("store") or str(Path(str(run.get("root"))).expanduser() / ".store"))]
    for key, value in places:
        if value:
            why = unwritable(Path(str(value)).expanduser())
            if why:
                raise ConfigError(f"{key}: cannot write to {value}: {why}")
