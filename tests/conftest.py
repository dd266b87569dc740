"""Shared fixtures: the CLI in-process (fast) or as a subprocess (signals, import checks), and the
override set that keeps a whole recipe to a few optimizer steps per stage."""
from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# A few steps per stage, logged every 2 steps so first/last loss are both seen.
QUICK = ["stages.cpt.max_steps=10", "stages.cpt.logging_steps=2",
         "stages.sft.max_steps=16", "stages.sft.logging_steps=2",
         "stages.dpo.max_steps=10", "stages.dpo.logging_steps=2", "stages.dpo.reward_eval_pairs=16"]


class Result:
    def __init__(self, code: int, out: str):
        self.code, self.out = code, out


def medpipe(*args: str) -> Result:
    """Run the CLI in this process (imports stay warm between tests)."""
    from typer.testing import CliRunner

    from medpipe.commands.cli import app

    r = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return Result(r.exit_code, r.output)


def medpipe_proc(*args: str, timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medpipe.commands.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=kw.pop("cwd", REPO), **kw)


@contextlib.contextmanager
def served(run_dir: Path, stage: str, stop_after: int, ready_within: float = 120):
    """`medpipe serve RUN_DIR --stage S` on a free 127.0.0.1 port in a subprocess; yields its /v1
    URL once /models answers, terminates it afterwards."""
    import socket
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "medpipe.commands.cli", "serve", str(run_dir), "--stage", stage,
                             "--port", str(port), "--stop-after", str(stop_after)], cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + ready_within
        while True:
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "timeout"
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def runs(tmp_path) -> Path:
    return tmp_path / "runs"


def run_on_two_ranks(tmp_path: Path, recipe_text: str, port: int) -> Path:
    """Run a recipe under `deepspeed --num_gpus 2` (2 CPU processes, gloo, ZeRO-2); returns the run dir."""
    recipe = tmp_path / "two_ranks.yaml"
    recipe.write_text(recipe_text)
    run_dir = tmp_path / "runs" / "two_ranks"
    r = medpipe("run", f"recipe={recipe}", f"run.root={tmp_path}/runs", f"run.dir={run_dir}",
                "launcher=deepspeed", "launcher.num_gpus=2", f"launcher.master_port={port}")
    assert r.code == 0, r.out
    return run_dir


def zero2_stage(run_dir: Path, link: str) -> dict:
    """A stage that ran on 2 ranks under ZeRO-2: the live engine said so, both ranks ended with the
    same trainable weights (digest per rank log), rank 0 alone wrote the artifact. Returns it."""
    import json
    import re

    sdir = (run_dir / link).resolve()
    art = read_artifact(sdir)
    assert art["metrics"]["world_size"] == 2 and art["metrics"]["zero_stage"] == 2
    logs = {p.name: p.read_text() for p in (sdir / "logs").glob("rank*.log")}
    assert set(logs) == {"rank0.log", "rank1.log"}
    digests = {re.search(r"world_size=2 zero_stage=2 weights_sha256=(\w+)", t).group(1) for t in logs.values()}
    assert len(digests) == 1  # both replicas ended identical
    assert sum(t.count("artifact written") for t in logs.values()) == 1  # written once, by rank 0
    assert (sdir / "deepspeed.json").is_file()
    return art


def ran_on_two_ranks(run_dir: Path, link: str, zero: int) -> dict:
    """A stage that ran on 2 ranks under ZeRO-`zero`; both ranks ended with the same (gathered)
    trainable weights (digest per rank log). Returns its artifact."""
    import re

    sdir = (run_dir / link).resolve()
    art = read_artifact(sdir)
    assert art["metrics"]["world_size"] == 2 and art["metrics"]["zero_stage"] == zero
    logs = [p.read_text() for p in sorted((sdir / "logs").glob("rank*.log"))]
    digests = {re.search(rf"world_size=2 zero_stage={zero} weights_sha256=(\w+)", t).group(1) for t in logs}
    assert len(logs) == 2 and len(digests) == 1
    return art


def read_artifact(stage_dir: Path) -> dict:
    """A stage's artifact.json as a dict, its recorded paths resolved as medpipe resolves them on load
    (inside the store they are written relative to the artifact's own dir: medpipe.artifact)."""
    import dataclasses
    import json

    from medpipe.artifact import PATH_FIELDS, Artifact

    raw = json.loads((Path(stage_dir) / "artifact.json").read_text())
    art = dataclasses.asdict(Artifact.load(Path(stage_dir).resolve()))
    for key in (*PATH_FIELDS, "task_models", "handoff"):
        if key in raw:
            raw[key] = art[key]
    return raw
