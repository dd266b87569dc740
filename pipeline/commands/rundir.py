"""Finding things in a run dir: its run.json, a stage's artifact (merged view for inference), and
`medpipe verify` (every done stage's files against what its artifact.json recorded)."""
from __future__ import annotations

from pathlib import Path

from medpipe.errors import MedpipeError


def run_info(run_dir: str | Path) -> dict:
    from medpipe.store import read_run_file

    return read_run_file(Path(run_dir))


def stage_artifact(run_dir: str | Path, stage: str | None = None, merged: bool = True):
    """(stage name, Artifact) of a done stage; `stage=None`: the last done stage that trains a model
    (not one that `evaluates` another). Its files are size-checked against its artifact.json first,
    so a truncated model is named here instead of failing inside the loader."""
    from medpipe.artifact import Artifact, check_files, merged_view, missing_model

    info = run_info(run_dir)
    names = [s["name"] for s in info["stages"]]
    done = [s for s in info["stages"] if Artifact.exists(s["store_dir"])]
    if stage is None:
        from .report import evaluates

        cands = [s for s in done if not evaluates(s["kind"])]
        if not cands:
            raise MedpipeError(f"{run_dir}: no stage is done yet")
        entry = cands[-1]
    else:
        entry = next((s for s in info["stages"] if s["name"] == stage), None)
        if entry is None:
            raise MedpipeError(f"{run_dir}: no stage '{stage}' (stages: {', '.join(names)})")
        if not Artifact.exists(entry["store_dir"]):
            raise MedpipeError(f"{run_dir}: stage '{stage}' is not done (no artifact.json)")
    art = Artifact.load(entry["store_dir"])  # ArtifactError (a MedpipeError) names a torn file
    problems = check_files(art, entry["store_dir"])
    gone = missing_model(art, entry["store_dir"])
    if gone:
        raise MedpipeError(gone)
    if problems:
        raise MedpipeError(f"stage '{entry['name']}' is broken: {problems[0]}; `medpipe run` retrains it")
    return entry["name"], (merged_view(art) if merged else art)


def verify_run(run_dir: str | Path) -> tuple[list[str], bool]:
    """One line per stage (sha256 of every recorded file re-computed) and whether all done stages
    are intact. Stages not done are listed, not counted as failures."""
    from medpipe.artifact import Artifact, ArtifactError, check_files

    lines, ok = [], True
    for s in run_info(run_dir)["stages"]:
        sdir = Path(s["store_dir"])
        if not Artifact.exists(sdir):
            lines.append(f"- {s['name']}: not done")
            continue
        try:
            art = Artifact.load(sdir)
        except ArtifactError as e:
            lines.append(f"✗ {s['name']}: {e}")
            ok = False
            continue
        if not art.files:
            lines.append(f"? {s['name']}: artifact.json records no file digests (written before medpipe recorded them)")
            continue
        problems = check_files(art, sdir, full=True)
        if problems:
            ok = False
            lines += [f"✗ {s['name']}: {p}" for p in problems]
        else:
            size = sum(f["size"] for f in art.files.values())
            lines.append(f"✓ {s['name']}: {len(art.files)} files, {size / 1e6:.1f} MB, sha256 as recorded")
    return lines, ok
