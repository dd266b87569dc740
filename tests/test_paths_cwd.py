"""A run works from any directory: started in one working directory with the default (relative)
run.root, then evaluated, chatted with, served and reported from another; a run dir moved with its
store still loads; artifacts written with cwd-relative paths (before paths were resolved) still load;
a deleted model dir is one line naming the artifact."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO

RECIPE = textwrap.dedent("""\
    defaults: [base, model: tiny, data: sample, stage/sft@stages.sft, _self_]
    name: cwd
    stages:
      sft: {data: "${data.dialogue}", max_steps: 1, max_length: 128, peft: {r: 4, alpha: 8}}
    """)
EXAM = '{"question": "头痛首选？", "options": {"A": "休息", "B": "手术"}, "answer_idx": "A"}\n'


def cli(cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medpipe.commands.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def started_elsewhere(tmp_path_factory):
    """(the run's working dir, the run dir) of a one-step LoRA SFT run with run.root=runs (relative)."""
    home = tmp_path_factory.mktemp("home")
    (home / "r.yaml").write_text(RECIPE)
    r = cli(home, "run", "recipe=r.yaml", "run.root=runs", "run.dir=runs/one")
    assert r.returncode == 0, r.stdout + r.stderr
    return home, home / "runs" / "one"


@pytest.mark.slow
def test_artifacts_record_paths_findable_from_anywhere(started_elsewhere):
    home, run_dir = started_elsewhere
    entry = next((home / "runs" / ".store").glob("sft-*"))
    art = json.loads((entry / "artifact.json").read_text())
    # inside the entry: relative to it; outside (the base model in the cache): absolute
    assert art["model_path"] == "adapter" and art["merged_path"] == "merged", art
    assert Path(art["base_model_path"]).is_absolute(), art
    run_file = json.loads((run_dir / "run.json").read_text())
    assert run_file["stages"][0]["store_dir"] == str(entry.resolve())


@pytest.mark.slow
def test_eval_chat_report_serve_from_another_directory(started_elsewhere, tmp_path):
    home, run_dir = started_elsewhere
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "exam.jsonl").write_text(EXAM, encoding="utf-8")
    r = cli(elsewhere, "eval", str(run_dir), "--stage", "sft", "data={path: exam.jsonl, format: medqa}",
            "method=ppl")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and (run_dir / "eval" / "sft.json").is_file()
    r = cli(elsewhere, "chat", str(run_dir), "-m", "头痛怎么办？", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli(elsewhere, "report", str(run_dir))
    assert r.returncode == 0 and (run_dir / "report.md").is_file(), r.stdout + r.stderr
    # serve: static start-up (model loaded, server up) and stops by itself
    r = cli(elsewhere, "serve", str(run_dir), "--stage", "sft", "--port", "0", "--stop-after", "1", timeout=300)
    assert r.returncode == 0 and "serving sft" in r.stdout + r.stderr, r.stdout + r.stderr


@pytest.mark.slow
def test_run_dir_moved_with_its_store_still_loads(started_elsewhere, tmp_path):
    from medpipe.commands.rundir import stage_artifact

    home, _ = started_elsewhere
    moved = tmp_path / "moved"
    shutil.copytree(home / "runs", moved, symlinks=True)
    name, art = stage_artifact(moved / "one", "sft")
    assert name == "sft" and art.model_path == str((next(moved.glob(".store/sft-*")) / "merged").resolve())


@pytest.mark.slow
def test_an_artifact_with_cwd_relative_paths_still_loads(started_elsewhere, tmp_path, monkeypatch):
    """artifact.json files written before this change recorded `runs/.store/sft-KEY/merged`."""
    from medpipe.artifact import Artifact

    home, _ = started_elsewhere
    old = tmp_path / "old"
    shutil.copytree(home / "runs", old / "runs", symlinks=True)
    entry = next((old / "runs" / ".store").glob("sft-*"))
    data = json.loads((entry / "artifact.json").read_text())
    data.update(model_path=f"runs/.store/{entry.name}/adapter", merged_path=f"runs/.store/{entry.name}/merged",
                tokenizer_path=f"runs/.store/{entry.name}/adapter")
    (entry / "artifact.json").write_text(json.dumps(data))
    monkeypatch.chdir(tmp_path)   # not the directory the paths were relative to
    art = Artifact.load(entry)
    assert art.merged_path == str(entry.resolve() / "merged") and Path(art.model_path).is_dir()


@pytest.mark.slow
def test_a_deleted_model_dir_is_one_line_naming_the_artifact(started_elsewhere, tmp_path):
    home, _ = started_elsewhere
    copy = tmp_path / "copy"
    shutil.copytree(home / "runs", copy, symlinks=True)
    entry = next(copy.glob(".store/sft-*"))
    shutil.rmtree(entry / "merged")
    shutil.rmtree(copy / "one" / "eval", ignore_errors=True)   # (an earlier test evaluated the original)
    (tmp_path / "exam.jsonl").write_text(EXAM, encoding="utf-8")
    r = cli(tmp_path, "eval", str(copy / "one"), "--stage", "sft", "data={path: exam.jsonl, format: medqa}")
    assert r.returncode == 2, r.stdout + r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("medpipe: error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"{entry.resolve()}/artifact.json: merged_path" in errors[0] and "does not exist" in errors[0], errors
    assert not (copy / "one" / "eval").exists()   # no empty eval dir left behind
