"""The artifact a stage hands to the next one (DESIGN.md), its atomic writes, and the stable
hashes that give a stage its identity in the content-addressed store."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import __version__

ARTIFACT_FILE = "artifact.json"
FORMATS = ("full", "adapter", "merged")


@dataclasses.dataclass
class Artifact:
    stage: str
    kind: str
    format: str  # full | adapter | merged
    model_path: str
    tokenizer_path: str
    base_model_path: str | None = None  # for adapters: the model the adapter applies to
    config_hash: str = ""
    inputs_hash: str = ""
    metrics: dict = dataclasses.field(default_factory=dict)
    # What a stage hands on besides the model, as typed fields (never free string keys):
    trust_remote_code: bool = False  # the model's code comes from its directory (Baichuan, Qwen-14B)
    merged_path: str | None = None  # adapter artifacts: base + adapter folded into one plain model dir
    task_models: dict = dataclasses.field(default_factory=dict)  # {task: merged model dir} (C-Poly)
    dataset_path: str | None = None  # a dataset this stage produced (VoC labels) for a later stage
    dataset_records: int | None = None
    evaluated_stage: str | None = None  # eval stages: whose model was scored
    results: dict = dataclasses.field(default_factory=dict)  # eval stages: per-set results
    # A kind's own typed record (e.g. MedCare's KA weights), written and read by that kind's library
    # through a dataclass of its own; the engine only stores it.
    handoff: dict = dataclasses.field(default_factory=dict)
    created: str = ""
    medpipe_version: str = __version__

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"artifact format must be one of {FORMATS}, got {self.format!r}")

    @property
    def key(self) -> str:
        """Identity of the stage result: its config and its inputs."""
        return stage_key(self.config_hash, self.inputs_hash)

    def save(self, directory: str | Path) -> Path:
        if not self.created:
            self.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return write_json_atomic(Path(directory) / ARTIFACT_FILE, dataclasses.asdict(self))

    @classmethod
    def load(cls, directory: str | Path) -> "Artifact":
        data = json.loads((Path(directory) / ARTIFACT_FILE).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def exists(cls, directory: str | Path) -> bool:
        return (Path(directory) / ARTIFACT_FILE).is_file()


def stage_key(config_hash: str, inputs_hash: str) -> str:
    """A stage's identity in the store: the one function both the planner and artifacts use."""
    return stable_hash({"config": config_hash, "inputs": inputs_hash})


def stable_hash(obj: Any, length: int = 16) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def write_json_atomic(path: Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> Path:
    """Write to a temp file in the same directory, fsync, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextmanager
def atomic_dir(out: Path):
    """Yield a fresh temp dir beside `out`; when the block succeeds it replaces `out` in one rename,
    so readers never see half a directory and a failure leaves the old one untouched."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def model_fingerprint(path: str | Path) -> str:
    """Cheap identity of a model directory: config + file names, sizes and mtimes."""
    p = Path(path)
    if not p.is_dir():
        return stable_hash({"ref": str(path)})
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir() if f.is_file())
    config = (p / "config.json").read_text() if (p / "config.json").is_file() else ""
    return stable_hash({"files": files, "config": config})


def merged_view(art: Artifact) -> Artifact:
    """The full-model view of an artifact: an adapter artifact points at the plain model its stage
    merged when it finished (`merged_path`); other formats are their own view. The engine never
    merges: that is model code, done by the stage that trained the adapter."""
    if art.format != "adapter":
        return art
    if not art.merged_path:
        raise ValueError(f"adapter artifact of stage {art.stage} has no merged_path")
    return dataclasses.replace(art, format="merged", model_path=art.merged_path, tokenizer_path=art.merged_path)
