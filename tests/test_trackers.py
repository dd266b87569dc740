"""Experiment trackers: one tracker run per pipeline, each stage a child (MLflow, local file store)
or a run in the pipeline's group (W&B, offline: no network), the resolved config and every stage's
metrics and artifact paths logged; TensorBoard stays the default."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import medpipe, read_artifact

RECIPE = """
defaults: [base, model: tiny, data: sample, stage/cpt@stages.cpt, stage/sft@stages.sft, stage/eval@stages.eval, _self_]
name: tracked
stages:
  cpt: {data: "${data.pretrain}", block_size: 64, max_steps: 4, logging_steps: 2, batch_size: 2, lr: 3e-3, save_steps: 50}
  sft: {data: "${data.dialogue}", lr: 5e-3, max_steps: 4, logging_steps: 2, batch_size: 2, max_length: 64,
        save_steps: 50, peft: {r: 4, alpha: 8}}
  eval: {data: [{path: "${medpipe:samples}/mcq_cmexam.csv", format: cmexam, limit: 4}], method: cue, max_new_tokens: 4}
"""


MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID",
              "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")


def fresh_install_env(monkeypatch) -> None:
    """No MLflow variable at all, as on a fresh install (and whatever the in-process run sets in
    os.environ is removed again after the test)."""
    for name in MLFLOW_ENV:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


@pytest.fixture
def offline_trackers(tmp_path, monkeypatch):
    """MLflow as shipped (its default store under run.root, no MLFLOW_* variable); W&B offline (the
    user's choice on a machine without network)."""
    fresh_install_env(monkeypatch)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_PROJECT", "medpipe-test")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_RUN_GROUP", "unset")
    (tmp_path / "wandb").mkdir()
    recipe = tmp_path / "tracked.yaml"
    recipe.write_text(RECIPE)
    return recipe


def _runs(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"file:{tmp_path}/runs/mlruns")   # medpipe's default: <run.root>/mlruns
    exp = client.get_experiment_by_name("medpipe-tracked")
    return client, client.search_runs([exp.experiment_id], max_results=100)


@pytest.mark.slow
def test_one_mlflow_parent_per_pipeline_a_child_per_stage_and_wandb_groups(tmp_path, offline_trackers):
    run_dir = tmp_path / "runs" / "tracked"
    args = ["run", f"recipe={offline_trackers}", f"run.root={tmp_path}/runs", f"run.dir={run_dir}",
            "tracking=[tensorboard,mlflow,wandb]"]
    r = medpipe(*args)
    assert r.code == 0, r.out
    client, runs = _runs(tmp_path)
    parents = [x for x in runs if "mlflow.parentRunId" not in x.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_name == "tracked" and parent.info.status == "FINISHED"
    assert parent.data.params["stages.sft.lr"] == "0.005"  # the resolved config
    assert parent.data.params["model.name"] == "tiny"
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["config.yaml"]
    children = {x.info.run_name: x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"cpt", "sft", "eval"}
    arts = {n: read_artifact(run_dir / d)
            for n, d in (("cpt", "01-cpt"), ("sft", "02-sft"), ("eval", "03-eval"))}
    for name, child in children.items():
        assert child.info.status == "FINISHED", name
        assert child.data.tags["path.store_dir"] == str((run_dir / f"0{list(arts).index(name) + 1}-{name}").resolve())
    for name in ("cpt", "sft"):  # the trainer's own MLflow callback logged into the pre-made child
        losses = client.get_metric_history(children[name].info.run_id, "loss")
        assert [m.step for m in losses] == [2, 4]
        assert children[name].data.params["learning_rate"] in ("0.003", "0.005")
        # artifact.json records paths inside its entry relative to it; trackers get them absolute
        entry = (run_dir / f"0{list(arts).index(name) + 1}-{name}").resolve()
        assert children[name].data.tags["path.model"] == str(entry / arts[name]["model_path"])
        assert parent.data.metrics[f"{name}.last_loss"] == pytest.approx(arts[name]["metrics"]["last_loss"])
    assert children["sft"].data.tags["path.merged"] == str((run_dir / "02-sft").resolve() / arts["sft"]["merged_path"])
    assert parent.data.metrics["eval.cmexam_acc"] == arts["eval"]["metrics"]["cmexam/acc"]
    # W&B offline: one run per training stage and the pipeline's own, all in the run dir's group
    offline = sorted((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert len(offline) == 3
    records = [next(p.glob("run-*.wandb")).read_bytes() for p in offline]
    assert all(b"tracked" in rec for rec in records)  # the group (= the run dir's name)
    assert sum(b"pipeline" in rec for rec in records) >= 1
    assert any(b"cpt" in rec for rec in records) and any(b"sft" in rec for rec in records)
    # a rerun: every stage reused, a new pipeline run whose children say so
    r = medpipe(*args)
    assert r.code == 0, r.out
    client, runs = _runs(tmp_path)
    parents = [x for x in runs if "mlflow.parentRunId" not in x.data.tags]
    assert len(parents) == 2
    newest = max(parents, key=lambda x: x.info.start_time)
    reused = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == newest.info.run_id]
    assert sorted(x.info.run_name for x in reused) == ["cpt", "eval", "sft"]
    assert {x.data.tags["medpipe.reused"] for x in reused} == {"true"}


def test_tensorboard_is_the_default_and_unknown_trackers_are_named():
    from medpipe.compose import compose
    from medpipe.errors import ConfigError
    from medpipe.tracking import trackers

    cfg, _ = compose("qilin")
    assert trackers(cfg) == ["tensorboard"]
    cfg, _ = compose("qilin", ["tracking=[mlflow,neptune]"])
    with pytest.raises(ConfigError, match=r"^tracking: unknown tracker 'neptune' \(known: tensorboard, mlflow, wandb\)$"):
        trackers(cfg)


def test_a_stage_reports_to_what_the_driver_set(monkeypatch):
    from types import SimpleNamespace

    from medpipe.stages.training.tracking import report_kwargs

    monkeypatch.delenv("MEDPIPE_TRACKING", raising=False)
    monkeypatch.delenv("MEDPIPE_RUN_NAME", raising=False)
    assert report_kwargs(SimpleNamespace(name="sft")) == {"report_to": ["tensorboard"], "run_name": "sft"}
    monkeypatch.setenv("MEDPIPE_TRACKING", "tensorboard,mlflow,wandb")
    assert report_kwargs(SimpleNamespace(name="sft"))["report_to"] == ["tensorboard", "mlflow", "wandb"]


ONE_STAGE = """
defaults: [base, model: tiny, data: sample, stage/sft@stages.sft, _self_]
name: tracked1
stages:
  sft: {data: "${data.dialogue}", max_steps: 2, logging_steps: 1, batch_size: 2, max_length: 64, save_steps: 50}
"""


def _clean_env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "WANDB_"))}


@pytest.mark.slow
def test_the_documented_default_mlflow_store_works_as_shipped(tmp_path):
    """`tracking=[tensorboard,mlflow]` with no MLFLOW_* variable, in a process of its own: mlflow 3
    refuses its file store without an opt-in the user never set (a 30-line traceback before)."""
    import subprocess
    import sys

    from conftest import REPO

    (tmp_path / "r.yaml").write_text(ONE_STAGE)
    r = subprocess.run([sys.executable, "-m", "medpipe.commands.cli", "run", f"recipe={tmp_path}/r.yaml",
                        f"run.root={tmp_path}/runs", "tracking=[tensorboard,mlflow]"], cwd=REPO, env=_clean_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    runs = list((tmp_path / "runs" / "mlruns").glob("*/*/meta.yaml"))
    assert len(runs) == 2, runs   # the pipeline's run and the sft stage's child
    assert all("status: 3" in p.read_text() for p in runs), [p.read_text() for p in runs]   # FINISHED


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", ["validate", "run"])
def test_an_unreachable_mlflow_server_is_one_line_before_anything_is_written(tmp_path, command, monkeypatch):
    import time

    fresh_install_env(monkeypatch)
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    (tmp_path / "r.yaml").write_text(ONE_STAGE)
    started = time.monotonic()
    r = medpipe(command, f"recipe={tmp_path}/r.yaml", f"run.root={tmp_path}/runs", "tracking=[tensorboard,mlflow]")
    assert r.code == 2, r.out
    errors = [ln for ln in r.out.splitlines() if ln.startswith("medpipe: error:")]
    assert errors == [f"medpipe: error: tracking: mlflow server {uri} (MLFLOW_TRACKING_URI): no answer within 3 s "
                      f"([Errno 111] Connection refused); start it, or unset MLFLOW_TRACKING_URI for the local store "
                      f"under run.root"], r.out
    assert time.monotonic() - started < 30
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("tracked1-*"))


def test_an_mlflow_failure_during_a_run_is_one_line(monkeypatch):
    """The server went away after the run started: the call's error is one MedpipeError line."""
    from medpipe.errors import MedpipeError
    from medpipe.tracking import mlflow_errors

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.1:5000")
    with pytest.raises(MedpipeError, match=r"^tracking: mlflow at http://10.0.0.1:5000: Max retries exceeded "
                                           r"\(finished stages are kept; rerun to continue\)$"):
        with mlflow_errors():
            raise ConnectionError("Max retries exceeded\nmore detail")
