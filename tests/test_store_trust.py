"""Trusting the store: reuse verifies the files an artifact recorded, the next stage's key follows
the content its upstream handed on, torn JSON is named (never a traceback, never "done"), OS
errors and Ctrl-C end a stage with one message, resumed stages keep a clean history and time."""
from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from conftest import medpipe, medpipe_proc

PLUGINS = Path(__file__).parent / "plugins"


@pytest.fixture
def kinds(monkeypatch, tmp_path):
    """The test stage kinds of tests/plugins/store_stages.py, registered as a plugin would be."""
    from medpipe import registry

    monkeypatch.syspath_prepend(str(PLUGINS))
    import store_stages

    names = {"weights": store_stages.WeightsStage, "consume": store_stages.ConsumeStage, "fail": store_stages.FailStage}
    for name, cls in names.items():
        registry.register(name, cls)
    monkeypatch.setenv("MEDPIPE_TEST_COUNT", str(tmp_path / "count"))
    monkeypatch.setenv("MEDPIPE_TEST_WEIGHTS", "a")
    monkeypatch.setenv("COLUMNS", "400")  # one table row per line in `status`
    yield
    for name in names:
        registry.unregister(name)


def states(run_dir: Path) -> dict[str, tuple[str, str]]:
    """`medpipe status` as {stage: (state column, whole line)}."""
    # a process of its own: the table's width comes from COLUMNS, not from whatever console an
    # earlier in-process run of this test session left behind
    r = medpipe_proc("status", str(run_dir), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line.split("│") for line in r.stdout.splitlines() if line.count("│") >= 5]
    return {cols[1].strip(): (cols[3].strip(), "│".join(cols)) for cols in rows}


def recipe(tmp_path: Path, stages: str) -> list[str]:
    r = tmp_path / "trust.yaml"
    r.write_text(textwrap.dedent("""
        defaults: [base, model: tiny, _self_]
        name: trust
        stages:
    """) + textwrap.indent(textwrap.dedent(stages), "  "))
    return [f"recipe={r}", f"run.root={tmp_path}/runs", f"run.dir={tmp_path}/runs/r"]


TWO = """
w: {kind: weights}
c: {kind: consume}
"""


def runs_of_consume(tmp_path: Path) -> int:
    path = tmp_path / "count"
    return int(path.read_text()) if path.exists() else 0


def entry(tmp_path: Path, link: str) -> Path:
    return (tmp_path / "runs" / "r" / link).resolve()


def test_artifact_records_size_and_sha256_of_what_it_hands_on(kinds, tmp_path):
    import hashlib

    r = medpipe("run", *recipe(tmp_path, TWO))
    assert r.code == 0, r.out
    sdir = entry(tmp_path, "01-w")
    art = json.loads((sdir / "artifact.json").read_text())
    weights = (sdir / "model" / "weights.bin").read_bytes()
    assert art["files"]["model/weights.bin"] == {"size": 1000, "sha256": hashlib.sha256(weights).hexdigest()}
    assert sorted(art["files"]) == ["model/config.json", "model/weights.bin"]
    assert len(art["content_digest"]) == 32


def test_upstream_rerun_with_other_weights_reruns_downstream_same_weights_does_not(kinds, tmp_path, monkeypatch):
    args = recipe(tmp_path, TWO)
    assert medpipe("run", *args).code == 0
    assert runs_of_consume(tmp_path) == 1
    first_c = entry(tmp_path, "02-c")

    r = medpipe("run", *args, "--only", "w", "--force")  # same weights again ("a")
    assert r.code == 0, r.out
    r = medpipe("run", *args)
    assert r.code == 0 and r.out.count("✓ reused") == 2, r.out
    assert runs_of_consume(tmp_path) == 1 and entry(tmp_path, "02-c") == first_c

    monkeypatch.setenv("MEDPIPE_TEST_WEIGHTS", "b")  # same key, other weights
    assert medpipe("run", *args, "--only", "w", "--force").code == 0
    r = medpipe("run", *args)
    assert r.code == 0, r.out
    assert runs_of_consume(tmp_path) == 2  # the consumer of the old weights is not reused
    second_c = entry(tmp_path, "02-c")
    assert second_c != first_c and (second_c / "model" / "seen.bin").read_bytes() == b"b" * 1000
    run_file = json.loads((tmp_path / "runs" / "r" / "run.json").read_text())
    assert run_file["stages"][1]["store_dir"] == str(second_c)  # run.json follows the rekeyed entry


def test_truncated_model_file_is_named_kept_aside_and_retrained(kinds, tmp_path):
    args = recipe(tmp_path, TWO)
    assert medpipe("run", *args).code == 0
    sdir = entry(tmp_path, "01-w")
    weights = sdir / "model" / "weights.bin"
    os.truncate(weights, 10)
    st = states(tmp_path / "runs" / "r")
    assert st["w"][0] == f"broken ({weights}: 10 bytes, artifact.json recorded 1000)" and st["c"][0] == "done"
    serve_err = medpipe("chat", str(tmp_path / "runs" / "r"), "--stage", "w", "-m", "hi")
    assert serve_err.code == 2 and f"{weights}: 10 bytes, artifact.json recorded 1000" in serve_err.out

    r = medpipe("run", *args)
    assert r.code == 0, r.out
    assert f"✗ not reusable: {weights}: 10 bytes, artifact.json recorded 1000; retraining" in r.out.replace("\n", "")
    kept = list(sdir.parent.glob(f"{sdir.name}.replaced-*"))
    assert len(kept) == 1 and (kept[0] / "model" / "weights.bin").stat().st_size == 10
    assert weights.stat().st_size == 1000
    assert runs_of_consume(tmp_path) == 1  # same weights again: the consumer is still reused


def test_same_size_corruption_is_found_by_verify_and_by_run_verify_full(kinds, tmp_path):
    args = recipe(tmp_path, TWO)
    assert medpipe("run", *args).code == 0
    weights = entry(tmp_path, "01-w") / "model" / "weights.bin"
    weights.write_bytes(b"z" * 1000)
    ok = medpipe("verify", str(tmp_path / "runs" / "r"))
    assert ok.code == 1
    assert f"✗ w: {weights}: sha256 differs from the one artifact.json recorded" in ok.out
    assert "✓ c: 1 files" in ok.out
    assert "✓ reused" in medpipe("run", *args).out  # size check only by default
    r = medpipe("run", *args, "run.verify=full")
    assert r.code == 0 and f"✗ not reusable: {weights}: sha256 differs" in r.out.replace("\n", ""), r.out
    assert medpipe("verify", str(tmp_path / "runs" / "r")).code == 0
    bad = medpipe("run", *args, "run.verify=sometimes")
    assert bad.code == 2 and "run.verify: must be size or full, got 'sometimes'" in bad.out


def test_torn_artifact_status_and_run_files_are_named_never_done(kinds, tmp_path):
    args = recipe(tmp_path, TWO)
    assert medpipe("run", *args).code == 0
    run_dir = tmp_path / "runs" / "r"
    art_file = entry(tmp_path, "01-w") / "artifact.json"
    text = art_file.read_text()
    art_file.write_text(text[: len(text) // 2])
    state = states(run_dir)["w"][0]
    assert state.startswith(f"broken ({art_file}: not valid JSON (line "), state
    rep = medpipe("report", str(run_dir))
    assert rep.code == 0, rep.out
    assert "broken (" in (run_dir / "report.md").read_text()
    r = medpipe("run", *args)
    assert r.code == 0 and "not valid JSON (line" in r.out and "retraining" in r.out, r.out

    status_file = entry(tmp_path, "02-c") / "status.json"
    (entry(tmp_path, "02-c") / "artifact.json").unlink()
    status_file.write_text('{"state": "do')
    assert states(run_dir)["c"][0].startswith(f"broken ({status_file}: not a readable status (")

    (run_dir / "run.json").write_text("{")
    for cmd in ("status", "report", "verify"):
        r = medpipe(cmd, str(run_dir))
        assert r.code == 2 and f"{run_dir / 'run.json'}: not a readable run file" in r.out, (cmd, r.out)


@pytest.mark.parametrize("what, needle", [
    ("enospc", "no space left on the device writing {target} ("),
    ("wrapped", "no space left on the device writing {sdir} ("),
    ("eacces", "Permission denied: {target} (errno EACCES)"),
    ("torch", "writing under {sdir} failed ([enforce fail at inline_container.cc:672] . unexpected pos 2103680 vs 2103568; "),
])
def test_os_errors_end_the_stage_with_one_line_and_a_failed_status(kinds, tmp_path, monkeypatch, what, needle):
    monkeypatch.setenv("MEDPIPE_TEST_RAISE", what)
    r = medpipe("run", *recipe(tmp_path, "f: {kind: fail}\n"))
    sdir = entry(tmp_path, "01-f")
    want = needle.format(target=sdir / "model" / "model.safetensors", sdir=sdir)
    assert r.code == 2 and "Traceback" not in r.out, r.out
    error_lines = [line for line in r.out.splitlines() if line.startswith("medpipe: error:")]
    assert len(error_lines) == 1 and want in error_lines[0], r.out
    status = json.loads((sdir / "status.json").read_text())
    assert status["state"] == "failed" and want in status["error"]
    assert not (sdir / ".space-reserve").exists()


def test_ctrl_c_says_which_stage_and_how_to_resume(kinds, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDPIPE_TEST_RAISE", "interrupt")
    args = recipe(tmp_path, TWO + "f: {kind: fail}\n")
    r = medpipe("run", *args, "--force")
    assert r.code == 130, r.out
    flat = r.out.replace("\n", " ")
    assert "stage f interrupted; its checkpoints are kept. Resume with:" in flat
    assert f"medpipe run {args[0]} {args[1]} run.dir={tmp_path}/runs/r" in flat
    assert json.loads((entry(tmp_path, "03-f") / "status.json").read_text())["state"] == "interrupted"


def test_history_trim_keeps_the_lines_up_to_the_resumed_checkpoint(tmp_path):
    from medpipe import history

    rows = [{"step": s, "loss": float(10 - s)} for s in range(1, 8)] + [{"step": 3, "eval_loss": 1.0}]
    (tmp_path / history.FILE).write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "lo')
    assert history.checkpoint_step(tmp_path / "checkpoints" / "checkpoint-4") == 4
    assert history.trim(tmp_path, 4) == 5  # the torn line and steps 5-7 go
    assert [r["step"] for r in history.read(tmp_path)] == [1, 2, 3, 4, 3]
    history.append(tmp_path, 5, {"loss": 4.5})  # this attempt logs on from the checkpoint
    assert [r["step"] for r in history.read(tmp_path)] == [1, 2, 3, 4, 3, 5]
    assert history.mean_loss(tmp_path) == pytest.approx((9.0 + 8.0 + 7.0 + 6.0 + 4.5) / 5)
    assert history.trim(tmp_path, 0) == 0 and history.read(tmp_path) == []  # no checkpoint: starts again
    assert history.mean_loss(tmp_path) is None


@pytest.mark.slow
def test_a_run_stopped_after_a_checkpoint_resumes_to_the_uninterrupted_history_trimmed_once(tmp_path, monkeypatch):
    """A cpt stage stopped (Ctrl-C) at step 6 — checkpoint-4 saved, step 5 logged — and run again
    ends with the history of an uninterrupted run, line for line (same steps, same values), trimmed
    once, from the checkpoint it resumed, and with the same weights."""
    from medpipe import history
    from medpipe.stages.training import callbacks

    r = cpt_recipe(tmp_path, max_steps=8, save_steps=2)

    def args(store: str) -> list[str]:
        return [f"recipe={r}", f"run.root={tmp_path}/{store}", f"run.dir={tmp_path}/{store}/r"]

    assert medpipe("run", *args("whole")).code == 0
    whole_dir = (tmp_path / "whole" / "r" / "01-cpt").resolve()

    step_end = callbacks.ProgressCallback.on_step_end

    def stop_at_6(self, args, state, control, **kw):
        if state.global_step == 6:
            raise KeyboardInterrupt
        return step_end(self, args, state, control, **kw)

    monkeypatch.setattr(callbacks.ProgressCallback, "on_step_end", stop_at_6)
    assert medpipe("run", *args("cut")).code == 130
    sdir = (tmp_path / "cut" / "r" / "01-cpt").resolve()
    assert [p.name for p in sorted((sdir / "checkpoints").iterdir())] == ["checkpoint-2", "checkpoint-4"]
    assert [row["step"] for row in history.read(sdir)] == [1, 2, 3, 4, 5]  # step 5 is past the checkpoint
    monkeypatch.setattr(callbacks.ProgressCallback, "on_step_end", step_end)
    trims, trim = [], history.trim
    monkeypatch.setattr(history, "trim", lambda d, step: trims.append(step) or trim(d, step))
    again = medpipe("run", *args("cut"))
    assert again.code == 0, again.out
    assert "resuming from checkpoint-4" in again.out and trims == [4]

    def comparable(rows: list[dict]) -> list[dict]:
        # the trainer's summary line: its timings are the attempt's, and so is its train_loss (the
        # artifact's train_loss is the whole stage's, checked below)
        return [{k: v for k, v in row.items() if "runtime" not in k and "per_second" not in k and k != "train_loss"}
                for row in rows]

    want, got = comparable(history.read(whole_dir)), comparable(history.read(sdir))
    assert [row["step"] for row in got] == [row["step"] for row in want] == [1, 2, 3, 4, 5, 6, 7, 8, 8]
    assert got == want
    art, ref = (json.loads((d / "artifact.json").read_text())["metrics"] for d in (sdir, whole_dir))
    assert art["resumed_from"] == "checkpoint-4" and art["weights_sha256"] == ref["weights_sha256"]
    assert art["train_loss"] == pytest.approx(ref["train_loss"], abs=1e-6)


def cpt_recipe(tmp_path: Path, max_steps: int, save_steps: int) -> Path:
    """A recipe of one cpt stage on the tiny model, logging every step."""
    r = tmp_path / "cpt.yaml"
    r.write_text(textwrap.dedent(f"""
        defaults: [base, model: tiny, data: sample, stage/cpt@stages.cpt, _self_]
        name: cpt
        stages:
          cpt: {{data: "${{data.pretrain}}", block_size: 64, lr: 3e-3, batch_size: 4, max_steps: {max_steps},
                save_steps: {save_steps}, logging_steps: 1}}
    """))
    return r


def test_status_time_sums_the_attempts_including_a_killed_one(tmp_path):
    import time as _time
    from datetime import datetime, timezone

    from medpipe.store import earlier_attempts

    started = datetime.fromtimestamp(_time.time() - 100, timezone.utc).isoformat(timespec="seconds")
    (tmp_path / "log_history.jsonl").write_text("{}\n")
    os.utime(tmp_path / "log_history.jsonl", (_time.time() - 40, _time.time() - 40))
    attempts = earlier_attempts(tmp_path, {"state": "interrupted", "started": started, "ended": None,
                                            "attempts": [12.0]})
    assert attempts[0] == 12.0 and attempts[1] == pytest.approx(60, abs=2)
    assert earlier_attempts(tmp_path, {"state": "failed", "ended": "x", "attempts": [3.0, 4.0]}) == [3.0, 4.0]


def test_atomic_dir_removes_temp_dirs_of_dead_processes(tmp_path):
    from medpipe.artifact import atomic_dir

    out = tmp_path / "merged"
    dead = tmp_path / ".merged-999999999-abcd"
    old_style = tmp_path / ".merged-k2j4h5"
    live = tmp_path / f".merged-{os.getpid()}-other"
    for d in (dead, old_style, live):
        d.mkdir()
    with atomic_dir(out) as tmp:
        (tmp / "x").write_text("1")
    assert (out / "x").read_text() == "1"
    assert not dead.exists() and not old_style.exists() and live.exists()


def test_checkpoint_problems_are_found_from_headers(tmp_path):
    import struct
    import zipfile

    from medpipe.history import checkpoint_problem, last_complete_checkpoint

    def checkpoint(step: int) -> Path:
        ck = tmp_path / "checkpoints" / f"checkpoint-{step}"
        ck.mkdir(parents=True)
        (ck / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
        (ck / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
        with zipfile.ZipFile(ck / "optimizer.pt", "w") as z:
            z.writestr("data.pkl", b"x")
        return ck

    c2, c4, c6 = checkpoint(2), checkpoint(4), checkpoint(6)
    assert checkpoint_problem(c6) is None
    os.truncate(c6 / "adapter_model.safetensors", 80)
    (c4 / "trainer_state.json").write_text('{"global_st')
    said = []
    assert last_complete_checkpoint(tmp_path / "checkpoints", say=said.append) == str(c2)
    size = 8 + len(json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})) + 16
    assert said[0] == f"skipping checkpoint-6: adapter_model.safetensors: truncated (80 bytes, its header needs {size})"
    assert said[1].startswith("skipping checkpoint-4: trainer_state.json: unreadable (")
    os.truncate(c2 / "optimizer.pt", 10)
    assert checkpoint_problem(c2).startswith("optimizer.pt: unreadable (BadZipFile")


@pytest.mark.slow
def test_a_torn_newest_checkpoint_resumes_from_the_previous_one_with_the_same_weights(tmp_path):
    """A cpt stage trained to the end; then its result and its newest checkpoint's weights are
    torn (as a kill after that save and a bad disk would leave them): the rerun skips that
    checkpoint, saying why, resumes from the one before, logs a history that never goes back,
    records the whole stage's train loss, and ends with the uninterrupted run's weights."""
    import shutil

    r = cpt_recipe(tmp_path, max_steps=6, save_steps=3)
    args = [f"recipe={r}", f"run.root={tmp_path}/runs", f"run.dir={tmp_path}/runs/r"]
    first = medpipe("run", *args)
    assert first.code == 0, first.out
    sdir = entry(tmp_path, "01-cpt")
    want = json.loads((sdir / "artifact.json").read_text())
    first_attempts = json.loads((sdir / "status.json").read_text())["attempts"]
    (sdir / "artifact.json").unlink()
    shutil.rmtree(sdir / "model")
    torn = sdir / "checkpoints" / "checkpoint-6" / "model.safetensors"
    os.truncate(torn, torn.stat().st_size - 1000)
    size = torn.stat().st_size
    import time

    t0 = time.monotonic()
    rerun = medpipe("run", *args)
    rerun_wall = time.monotonic() - t0
    assert rerun.code == 0, rerun.out
    assert f"skipping checkpoint-6: model.safetensors: truncated ({size} bytes, its header needs {size + 1000})" in rerun.out
    assert "resuming from checkpoint-3" in rerun.out
    got = json.loads((sdir / "artifact.json").read_text())
    assert got["content_digest"] == want["content_digest"]
    assert got["metrics"]["weights_sha256"] == want["metrics"]["weights_sha256"]
    steps = [json.loads(line)["step"] for line in (sdir / "log_history.jsonl").read_text().splitlines()]
    losses = [json.loads(line).get("loss") for line in (sdir / "log_history.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and [s for s, l in zip(steps, losses) if l is not None] == [1, 2, 3, 4, 5, 6]
    assert got["metrics"]["train_loss"] == pytest.approx(sum(l for l in losses if l is not None) / 6)
    # the same 6 steps' losses as the uninterrupted run (same weights): its train_loss, to the log's rounding
    assert got["metrics"]["train_loss"] == pytest.approx(want["metrics"]["train_loss"], abs=1e-4)
    status = json.loads((sdir / "status.json").read_text())
    assert len(first_attempts) == 1 and status["attempts"][0] == first_attempts[0]  # the first run's time kept
    assert 0 < status["attempts"][1] <= rerun_wall  # ... and the rerun's added
    assert status["elapsed"] == pytest.approx(sum(status["attempts"]))


@pytest.mark.slow
def test_a_real_full_disk_fails_the_stage_with_one_line(tmp_path):
    """The store on a 6 MB tmpfs (root only; skipped elsewhere): the cpt checkpoint does not fit."""
    import subprocess

    from conftest import medpipe_proc

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        r = tmp_path / "cpt.yaml"
        r.write_text(textwrap.dedent("""
            defaults: [base, model: tiny, data: sample, stage/cpt@stages.cpt, _self_]
            name: nospace
            stages:
              cpt: {data: "${data.pretrain}", block_size: 64, lr: 3e-3, batch_size: 4, max_steps: 6, save_steps: 3}
        """))
        p = medpipe_proc("run", f"recipe={r}", f"run.root={disk}/runs", f"run.dir={disk}/runs/r")
        assert p.returncode == 2 and "Traceback" not in p.stderr + p.stdout, p.stderr[-3000:]
        assert "medpipe: error: stage cpt: no space left on the device writing " in p.stderr
        status = json.loads(next((disk / "runs" / ".store").glob("cpt-*/status.json")).read_text())
        assert status["state"] == "failed" and status["error"].startswith("stage cpt: no space left on the device")
    finally:
        subprocess.run(["umount", str(disk)])


def test_content_digest_ignores_the_order_peft_writes_its_module_set_in(tmp_path):
    from medpipe.artifact import Artifact, record_files

    def entry_with(modules: list[str], weights: bytes) -> str:
        d = tmp_path / f"e{len(list(tmp_path.iterdir()))}"
        (d / "adapter").mkdir(parents=True)
        (d / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": modules}))
        (d / "adapter" / "adapter_model.safetensors").write_bytes(weights)
        art = Artifact(stage="sft", kind="sft", format="adapter", model_path=str(d / "adapter"),
                       tokenizer_path=str(d / "adapter"))
        record_files(art, d)
        return art.content_digest

    a = entry_with(["q_proj", "v_proj", "o_proj"], b"w1")
    assert entry_with(["o_proj", "q_proj", "v_proj"], b"w1") == a  # same set, other hash order
    assert entry_with(["o_proj", "q_proj"], b"w1") != a
    assert entry_with(["q_proj", "v_proj", "o_proj"], b"w2") != a


def test_a_fifo_in_place_of_an_artifact_or_run_file_is_named_never_read(kinds, tmp_path):
    """Files medpipe reads from the store are type-checked before reading: a FIFO would block forever."""
    args = recipe(tmp_path, TWO)
    assert medpipe("run", *args).code == 0
    run_dir = tmp_path / "runs" / "r"
    art_file = entry(tmp_path, "01-w") / "artifact.json"
    art_file.unlink()
    os.mkfifo(art_file)
    assert states(run_dir)["w"][0] == f"broken ({art_file}: a FIFO (named pipe), not a regular file)"
    (run_dir / "run.json").unlink()
    os.mkfifo(run_dir / "run.json")
    for cmd in ("status", "report", "verify"):
        r = medpipe(cmd, str(run_dir))
        assert r.code == 2 and f"{run_dir / 'run.json'}: a FIFO (named pipe), not a regular file" in r.out, (cmd, r.out)
