"""Finding things in a run dir: its run.json, a stage's artifact (merged view for inference)."""
from __future__ import annotations

import json
from pathlib import Path

from medpipe.errors import MedpipeError


def run_info(run_dir: str | Path) -> dict:
    from medpipe.run import RUN_FILE

    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise MedpipeError(f"{run_dir} is not a medpipe run dir (no {RUN_FILE})")
    return json.loads(path.read_text())


def stage_artifact(run_dir: str | Path, stage: str | None = None, merged: bool = True):
    """(stage name, Artifact) of a done stage; `stage=None`: the last done stage that trains a model
    (not one that `evaluates` another)."""
    from medpipe.artifact import Artifact, merged_view

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
    art = Artifact.load(entry["store_dir"])
    return entry["name"], (merged_view(art) if merged else art)
