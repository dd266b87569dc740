"""A grpo stage killed with SIGKILL after a checkpoint resumes from it and ends with the same
trainable-weight digest as an uninterrupted run (same seed): rollouts, sampler and optimizer
state all come back from the checkpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, medpipe_proc

pytestmark = pytest.mark.slow

RECIPE = """
defaults: [base, model: tiny, data: sample, _self_]
name: resume
stages:
  grpo: {kind: grpo, data: "${data.medqa}", lr: 5e-2, max_steps: 4, save_steps: 1, batch_size: 4, num_generations: 2,
         max_completion_length: 8, beta: 0.1, heldout_eval: false, peft: {r: 4, alpha: 8},
         rewards: [{name: length, scale: 0.01, unit: chars}]}
"""


def digest(run_dir) -> dict:
    return json.loads(next(run_dir.glob("01-grpo/artifact.json")).read_text())["metrics"]


def test_killed_grpo_resumes_to_the_same_weights(tmp_path):
    recipe = tmp_path / "resume.yaml"
    recipe.write_text(RECIPE)
    straight = tmp_path / "a" / "r"
    p = medpipe_proc("run", f"recipe={recipe}", f"run.root={tmp_path}/a", f"run.dir={straight}")
    assert p.returncode == 0, p.stdout + p.stderr

    root, run_dir = tmp_path / "b", tmp_path / "b" / "r"
    args = [sys.executable, "-m", "medpipe.commands.cli", "run", f"recipe={recipe}", f"run.root={root}",
            f"run.dir={run_dir}"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline, ckpt = time.time() + 400, None
    while time.time() < deadline and proc.poll() is None:
        done = [c for c in root.glob(".store/grpo-*/checkpoints/checkpoint-2") if (c / "trainer_state.json").exists()]
        if done:
            ckpt = done[0]
            break
        time.sleep(0.2)
    assert ckpt is not None, "no checkpoint-2 appeared"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (ckpt.parent.parent / "artifact.json").exists()

    again = medpipe_proc("run", f"recipe={recipe}", f"run.root={root}", f"run.dir={run_dir}")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming from checkpoint-" in again.stdout
    resumed, uninterrupted = digest(run_dir), digest(straight)
    assert resumed["resumed_from"] in ("checkpoint-2", "checkpoint-3") and resumed["steps"] == 4
    assert resumed["weights_sha256"] == uninterrupted["weights_sha256"]
