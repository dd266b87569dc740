"""CPT with `stream: true` end to end (issue 14): validate checks every document in one pass that
holds none of them and still names file:line (a broken document stops it before any training);
a streamed stage SIGKILLed after a checkpoint resumes at the right position and ends with the
weights of an uninterrupted run."""
from __future__ import annotations

import json
import re

import pytest

from conftest import medpipe, read_artifact

pytestmark = pytest.mark.slow

STAGE = "cpt: {{kind: cpt, data: {data}, block_size: 32, max_steps: 3, batch_size: 2, lr: 1e-3, stream: {stream}}}"


def corpus(tmp_path, broken_at: int | None = None):
    lines = [json.dumps({"text": f"第{i}份病历：患者自述头痛{i % 7}天，伴恶心。医生建议休息、多饮水，必要时复诊。"},
                        ensure_ascii=False) for i in range(60)]
    if broken_at is not None:
        lines[broken_at - 1] = '{"text": 12}'
    p = tmp_path / "notes.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def recipe(tmp_path, data, stream: bool):
    p = tmp_path / f"cpt_{'stream' if stream else 'memory'}.yaml"
    p.write_text("defaults: [base, model: tiny, _self_]\nname: cptstream\nstages:\n  "
                 + STAGE.format(data=data, stream=str(stream).lower()) + "\n", encoding="utf-8")
    return p


def test_streamed_validate_checks_every_document_and_names_the_line(tmp_path):
    ok = corpus(tmp_path)
    r = medpipe("validate", f"recipe={recipe(tmp_path, ok, True)}", f"run.root={tmp_path}/runs")
    assert r.code == 0, r.out
    assert "streamed: every document checked in one pass" in r.out
    row = next(ln for ln in r.out.splitlines() if "notes.jsonl" in ln and "text" in ln)
    cells = row.split()
    assert cells[1:4] == ["text", "60", "60"]  # format, records, kept
    assert re.fullmatch(r"\d+", cells[-1]) and int(cells[-1]) > 0  # token max counted, not "-"
    bad = corpus(tmp_path, broken_at=57)
    r = medpipe("validate", f"recipe={recipe(tmp_path, bad, True)}", f"run.root={tmp_path}/runs")
    assert r.code == 2
    assert f"{bad}:57: field 'text'" in r.out and "Traceback" not in r.out


def run_streamed(tmp_path, data, run_dir, kill_after_checkpoint: int | None = None):
    """`medpipe run` in its own process group; with kill_after_checkpoint=k it is SIGKILLed as soon
    as checkpoint-k of the stage is complete (its trainer_state.json written)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    tmp_path.mkdir(exist_ok=True)
    args = [sys.executable, "-m", "medpipe.commands.cli", "run", f"recipe={recipe(tmp_path, data, True)}",
            f"run.root={tmp_path}/runs", f"run.dir={run_dir}", "stages.cpt.max_steps=6", "+stages.cpt.save_steps=2"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    if kill_after_checkpoint is not None:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if list((tmp_path / "runs" / ".store").glob(f"cpt-*/checkpoints/checkpoint-{kill_after_checkpoint}/"
                                                        "trainer_state.json")):
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    out = proc.communicate(timeout=600)[0]
    return proc.returncode, out


def test_streamed_cpt_killed_after_a_checkpoint_resumes_to_the_same_weights(tmp_path):
    """Resumable at the right position: the packed blocks are cached by fingerprint, so the
    rerun's trainer skips exactly the batches the checkpoint had seen."""
    data = corpus(tmp_path)
    code, out = run_streamed(tmp_path / "a", data, tmp_path / "a" / "run")
    assert code == 0, out
    assert "(streamed)" in out
    want = read_artifact(tmp_path / "a" / "run" / "01-cpt")["metrics"]
    code, out = run_streamed(tmp_path / "b", data, tmp_path / "b" / "run", kill_after_checkpoint=2)
    assert code == -9, out  # killed mid-stage
    # the kill lands after checkpoint-2 is complete; the trainer may have finished another one by then:
    # the rerun resumes from the newest checkpoint the kill left complete (trainer state written)
    left = sorted(int(p.parent.name.split("-")[1]) for p in
                  (tmp_path / "b" / "runs" / ".store").glob("cpt-*/checkpoints/checkpoint-*/trainer_state.json"))
    assert left, "no complete checkpoint when the kill landed"
    code, out = run_streamed(tmp_path / "b", data, tmp_path / "b" / "run")
    assert code == 0, out
    assert f"resuming from checkpoint-{left[-1]}" in out
    got = read_artifact(tmp_path / "b" / "run" / "01-cpt")["metrics"]
    assert got["resumed_from"] == f"checkpoint-{left[-1]}"
    assert got["blocks"] == want["blocks"] and got["documents"] == want["documents"] == 60
    assert got["weights_sha256"] == want["weights_sha256"]
