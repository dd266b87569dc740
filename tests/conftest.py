"""Shared fixtures: the CLI in-process (fast) or as a subprocess (signals, import checks), and the
override set that keeps a whole recipe to a few optimizer steps per stage."""
from __future__ import annotations

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

    from medpipe.cli import app

    r = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return Result(r.exit_code, r.output)


def medpipe_proc(*args: str, timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medpipe.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=kw.pop("cwd", REPO), **kw)


@pytest.fixture
def runs(tmp_path) -> Path:
    return tmp_path / "runs"
