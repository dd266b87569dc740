"""The artifact a stage hands to the next one (docs/CONTRACTS.md), its atomic writes, and the stable
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
from .errors import MedpipeError
from .paths import not_regular

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
    # Size and sha256 of every file the stage hands on, relative to its store entry ({path: {size,
    # sha256}}), and one digest of that content: reuse checks the files against `files`, and the
    # next stage's inputs hash is this digest (other weights under the same key rerun what follows).
    files: dict = dataclasses.field(default_factory=dict)
    content_digest: str = ""
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
        """artifact.json in `directory`; paths inside it are written relative to it (a store moved
        with its runs, or read from another working directory, still finds them), others absolute."""
        if not self.created:
            self.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        data = dataclasses.asdict(self)
        _map_paths(data, lambda p: _portable(p, Path(directory)), lambda v: _portable_handoff(v, Path(directory)))
        return write_json_atomic(Path(directory) / ARTIFACT_FILE, data)

    @classmethod
    def load(cls, directory: str | Path) -> "Artifact":
        """The artifact in `directory`; a file that is not a readable artifact raises ArtifactError
        naming it (a torn or hand-edited artifact.json is never taken for a finished stage)."""
        path = Path(directory) / ARTIFACT_FILE
        why = not_regular(path)
        if why:   # a FIFO in its place would block the reader forever
            raise ArtifactError(f"{path}: {why}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ArtifactError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{path}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None
        except OSError as e:
            raise ArtifactError(f"{path}: cannot be read ({e.strerror})") from None
        if not isinstance(data, dict):
            raise ArtifactError(f"{path}: not a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]  # type: ignore[misc]
        missing = [k for k in required if not isinstance(data.get(k), str)]
        if missing:
            raise ArtifactError(f"{path}: field {missing[0]!r} missing or not a string")
        try:
            art = cls(**{k: v for k, v in data.items() if k in known})
        except (TypeError, ValueError) as e:
            raise ArtifactError(f"{path}: {e}") from None
        _map_paths(art, lambda p: _located(p, Path(directory)), lambda v: _located_handoff(v, Path(directory)))
        return art

    @classmethod
    def exists(cls, directory: str | Path) -> bool:
        # any file type: a FIFO or a directory in its place is a broken artifact (load names it)
        return (Path(directory) / ARTIFACT_FILE).exists()


PATH_FIELDS = ("model_path", "tokenizer_path", "base_model_path", "merged_path", "dataset_path")


def _map_paths(obj: Any, fn, handoff_fn=None) -> None:
    """Apply `fn` to every path an artifact (or its dict) records, `handoff_fn` to every string of
    its kind's handoff record (which names its own dirs by path)."""
    get = obj.get if isinstance(obj, dict) else lambda k: getattr(obj, k)
    put = obj.__setitem__ if isinstance(obj, dict) else lambda k, v: setattr(obj, k, v)
    for name in PATH_FIELDS:
        if isinstance(get(name), str) and get(name):
            put(name, fn(get(name)))
    models = get("task_models")
    if isinstance(models, dict):
        put("task_models", {t: fn(p) if isinstance(p, str) and p else p for t, p in models.items()})
    if handoff_fn is not None and isinstance(get("handoff"), dict):
        put("handoff", _map_strings(get("handoff"), handoff_fn))


def _map_strings(obj: Any, fn) -> Any:
    if isinstance(obj, dict):
        return {k: _map_strings(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_strings(v, fn) for v in obj]
    return fn(obj) if isinstance(obj, str) else obj


def _portable(path: str, directory: Path) -> str:
    """A path in the artifact's own store relative to its directory ("model", "../sft-KEY/merged"):
    the store can be moved or copied whole; other paths absolute."""
    p, root = Path(path).expanduser().resolve(), directory.expanduser().resolve()
    if p == root or root in p.parents:
        return p.relative_to(root).as_posix() or "."
    if root.parent in p.parents:
        return os.path.relpath(p, root)
    if Path(path).expanduser().is_absolute() or Path(path).expanduser().exists():
        return str(p)
    return path   # a Hub id (model.allow_hub), kept as given


def _portable_handoff(value: str, directory: Path) -> str:
    """A handoff string that is an absolute path in the store: "./x" or "../entry/x" (resolved on load)."""
    if not os.path.isabs(value):
        return value
    p, root = Path(value).resolve(), directory.expanduser().resolve()
    if p == root or root.parent in p.parents:
        rel = os.path.relpath(p, root)
        return rel if rel.startswith("..") else f"./{rel}"
    return value


def _located_handoff(value: str, directory: Path) -> str:
    if value.startswith(("./", "../")):
        return str((directory.expanduser().resolve() / value).resolve())
    return value


def _located(path: str, directory: Path) -> str:
    """An absolute path for a recorded one. Relative paths are relative to the artifact's directory;
    artifacts written before that recorded them relative to the run's working directory
    ("runs/.store/sft-KEY/merged"): the part after the entry's own name is taken under it."""
    p = Path(path)
    if p.is_absolute():
        return path
    root = directory.expanduser().resolve()
    if root.name in p.parts:
        rest = p.parts[p.parts.index(root.name) + 1:]
        return str(root.joinpath(*rest))
    if len(p.parts) == 2 and not path.startswith(".") and not (root / p).exists():
        return path   # "org/name": a Hub id (model.allow_hub) kept as given
    return str((root / p).resolve())


class ArtifactError(MedpipeError):
    """An artifact.json that cannot be trusted: unreadable, or its files differ from what it records."""


# Files a trainer writes beside the weights that differ between identical runs (pickled arguments
# with paths and times): recorded and size-checked, but left out of the content digest.
RUN_METADATA = ("training_args.bin",)


def handed_on_paths(art: "Artifact") -> list[str]:
    """The paths a stage hands to later stages and to inference."""
    paths = [art.model_path, art.tokenizer_path, art.merged_path, art.dataset_path, *art.task_models.values()]
    return [p for p in dict.fromkeys(paths) if p]


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# JSON lists that are sets, written in hash order (PEFT's adapter_config.json): sorted for the digest
SET_VALUED = ("target_modules", "modules_to_save", "exclude_modules", "layers_to_transform")


def canonical_json_sha256(path: Path, places: dict[str, str] | None = None) -> str:
    """sha256 of a JSON file's content, not its bytes: keys sorted, set-valued lists sorted, so the
    same settings give the same digest in every process (PEFT writes target_modules from a set,
    whose order changes with PYTHONHASHSEED). A file that is not JSON: its bytes. `places` maps
    where things are on this machine (the store, the cache) to a neutral name first."""
    try:
        data = json.loads(_placeless(path.read_text(encoding="utf-8"), places))
    except (UnicodeDecodeError, ValueError):
        return file_sha256(path)

    def canon(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: (sorted(v, key=str) if k in SET_VALUED and isinstance(v, list) else canon(v)) for k, v in obj.items()}
        if isinstance(obj, list):
            return [canon(v) for v in obj]
        return obj

    blob = json.dumps(canon(data), sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()


def _places(entry: Path) -> dict[str, str]:
    """Where the store and the cache are here: an adapter's config and model card name its base
    model by path (`base_model_name_or_path`), which must not make the same weights another
    content in another store, cache or machine."""
    from .paths import cache_root

    return {str(entry.parent) + os.sep: "<store>/", str(cache_root().expanduser().resolve()) + os.sep: "<cache>/"}


def _placeless(text: str, places: dict[str, str] | None) -> str:
    for where, name in (places or {}).items():
        text = text.replace(where, name)
    return text


def _text_sha256(path: Path, places: dict[str, str]) -> str:
    try:
        return hashlib.sha256(_placeless(path.read_text(encoding="utf-8"), places).encode()).hexdigest()
    except (UnicodeDecodeError, ValueError):
        return file_sha256(path)


def record_files(art: "Artifact", directory: str | Path, input_digest: str = "") -> None:
    """Fill `art.files` (size + sha256 of every handed-on file inside `directory`, the stage's store
    entry) and `art.content_digest`. Paths outside the entry (a pass-through stage's input model)
    are another stage's files: for them the digest takes `input_digest`, the stage input's digest."""
    root = Path(directory).resolve()
    files: dict[str, dict] = {}
    outside = False
    for ref in handed_on_paths(art):
        p = Path(ref).resolve()
        if not p.exists():
            continue
        if root != p and root not in p.parents:
            outside = True
            continue
        for f in sorted([p] if p.is_file() else (q for q in p.rglob("*") if q.is_file())):
            rel = f.relative_to(root).as_posix()
            if rel not in files and not f.name.startswith("."):
                files[rel] = {"size": f.stat().st_size, "sha256": file_sha256(f)}
    art.files = files
    places = _places(root)
    content = {rel: (canonical_json_sha256(root / rel, places) if rel.endswith(".json") else
                     _text_sha256(root / rel, places) if rel.endswith(".md") else v["sha256"])
               for rel, v in files.items() if Path(rel).name not in RUN_METADATA}
    art.content_digest = stable_hash({"format": art.format, "files": content, "input": input_digest if outside else "",
                                      "handoff": json.loads(_placeless(json.dumps(art.handoff), places)),
                                      "dataset_records": art.dataset_records}, length=32)


def check_files(art: "Artifact", directory: str | Path, full: bool = False) -> list[str]:
    """What differs between the entry's files and what its artifact.json records, one line per file
    ("PATH: why"); sizes always, sha256 too when `full`. Empty: the files are the ones written."""
    root = Path(directory)
    problems = []
    for rel, want in sorted(art.files.items()):
        path = root / rel
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{path}: missing")
            continue
        if size != want.get("size"):
            problems.append(f"{path}: {size} bytes, artifact.json recorded {want.get('size')}")
        elif full and file_sha256(path) != want.get("sha256"):
            problems.append(f"{path}: sha256 differs from the one artifact.json recorded")
    return problems


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
    remove_stale_temp_dirs(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-{os.getpid()}-"))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temp_dirs(out: Path) -> None:
    """Temp dirs of earlier `atomic_dir(out)` blocks whose process died (kill -9 mid-merge): a temp
    dir is named `.<name>-<pid>-<random>`; one whose pid is not alive on this host is removed."""
    for tmp in out.parent.glob(f".{out.name}-*"):
        pid = tmp.name[len(out.name) + 2:].split("-", 1)[0]
        if tmp.is_dir() and not (pid.isdigit() and _pid_alive(int(pid))):
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def model_fingerprint(path: str | Path) -> str:
    """Cheap identity of a model directory: config + file names, sizes and mtimes."""
    p = Path(path)
    if not p.is_dir():
        return stable_hash({"ref": str(path)})
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir() if f.is_file())
    config = (p / "config.json").read_text() if (p / "config.json").is_file() else ""
    return stable_hash({"files": files, "config": config})


def missing_model(art: Artifact, directory: str | Path) -> str | None:
    """One line naming the artifact.json whose model / tokenizer / merged dir is gone (else the
    loader would take the path for a Hub id: "Repo id must be in the form ..."), or None."""
    for name in ("model_path", "tokenizer_path", "merged_path"):
        value = getattr(art, name)
        if value and Path(value).is_absolute() and not Path(value).exists():
            return (f"{Path(directory) / ARTIFACT_FILE}: {name} {value} does not exist (moved or deleted; "
                    f"`medpipe run` retrains the stage)")
    return None


def merged_view(art: Artifact) -> Artifact:
    """The full-model view of an artifact: an adapter artifact points at the plain model its stage
    merged when it finished (`merged_path`); other formats are their own view. The engine never
    merges: that is model code, done by the stage that trained the adapter."""
    if art.format != "adapter":
        return art
    if not art.merged_path:
        raise ValueError(f"adapter artifact of stage {art.stage} has no merged_path")
    return dataclasses.replace(art, format="merged", model_path=art.merged_path, tokenizer_path=art.merged_path)
