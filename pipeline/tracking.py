"""Experiment trackers, driver side: one tracker run per pipeline, each stage a child of it.

`tracking: [tensorboard, mlflow, wandb]` in the recipe (default [tensorboard]). The stage's trainer
logs through transformers' own integrations (stages/training/tracking.py picks `report_to`); the
driver only arranges where they log:

* MLflow: the driver creates the parent run (the pipeline: resolved config as params, config.yaml
  and every stage's metrics and artifact paths) and, before each stage, the child run
  (tag mlflow.parentRunId) whose id it hands on as MLFLOW_RUN_ID: transformers' MLflowCallback on
  rank 0 resumes and ends it, in this process or in any launcher's ranks. Only MlflowClient is used
  here, so no fluent run is active in the driver (an in-process stage would otherwise log into it).
  Store: $MLFLOW_TRACKING_URI, default file:<run.root>/mlruns. mlflow 3 keeps its file store in
  "maintenance mode" behind MLFLOW_ALLOW_FILE_STORE=true, and mlflow-skinny has no SQL store
  (no sqlalchemy): medpipe sets that opt-in for its own default store only, so the default works
  as shipped; a URI you set is used as you set it.
* W&B: the pipeline is a group (WANDB_RUN_GROUP = the run dir's name): one run per stage
  (name = job type = the stage) and one `pipeline` run holding the resolved config and every
  stage's metrics. WANDB_MODE=offline works without a network (`wandb sync` later).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator

from .errors import ConfigError, MedpipeError

KNOWN = ("tensorboard", "mlflow", "wandb")
STAGE_ENV = "MEDPIPE_TRACKING"  # what a stage's trainer reports to (comma list), set by the driver


def trackers(cfg: Any) -> list[str]:
    raw = cfg.get("tracking") if hasattr(cfg, "get") else None
    names = ["tensorboard"] if raw is None else ([raw] if isinstance(raw, str) else [str(x) for x in raw])
    for name in names:
        if name not in KNOWN:
            raise ConfigError(f"tracking: unknown tracker '{name}' (known: {', '.join(KNOWN)})")
    return names


def mlflow_uri(cfg: Any) -> str:
    """$MLFLOW_TRACKING_URI, else medpipe's default file store under run.root (with mlflow's
    opt-in for file stores set, for it alone). Also bounds mlflow's HTTP retries (its default
    retries an unreachable server for ~4 minutes) unless the user set them."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    return f"file:{(Path(cfg.run.root).expanduser() / 'mlruns').resolve()}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0][:200] if text else type(e).__name__)


def _answers(url: str, timeout: float) -> str | None:
    """None when an HTTP server answers at url (any status), else why not."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None   # it answered (404 / 401 on the root is still a server)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return f"no answer within {timeout:g} s ({_first_line(reason) if isinstance(reason, BaseException) else reason})"
    return None


def check_trackers(cfg: Any, timeout: float = 3.0) -> None:
    """Each configured tracker can be reached (validate, and run before it writes anything): an
    HTTP MLflow server answers, a file store is writable, W&B's server answers unless it runs
    offline. One line naming the tracker and the address."""
    names = trackers(cfg)
    if "mlflow" in names:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or ""
        if uri.startswith(("http://", "https://")):
            why = _answers(uri.rstrip("/") + "/health", timeout)
            if why:
                raise ConfigError(f"tracking: mlflow server {uri} (MLFLOW_TRACKING_URI): {why}; start it, or "
                                  f"unset MLFLOW_TRACKING_URI for the local store under run.root")
        elif uri.startswith("file:") or not uri:
            from .store import unwritable

            from urllib.parse import urlparse

            folder = Path(urlparse(uri).path) if uri else Path(str(cfg.run.root)).expanduser() / "mlruns"
            why = unwritable(folder)
            if why:
                raise ConfigError(f"tracking: mlflow store {folder}: {why}")
    if "wandb" in names and os.environ.get("WANDB_MODE", "online") not in ("offline", "disabled", "dryrun"):
        base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        why = _answers(base, timeout)
        if why:
            raise ConfigError(f"tracking: wandb server {base}: {why}; set WANDB_MODE=offline to log locally "
                              f"(`wandb sync` later)")


def _flat(d: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
    elif isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
        for i, v in enumerate(d):
            out.update(_flat(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = json.dumps(d) if isinstance(d, (list, dict)) else str(d)
    return out


def _numbers(metrics: dict) -> dict[str, float]:
    return {k.replace("/", "_"): float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}


@contextlib.contextmanager
def mlflow_errors() -> Iterator[None]:
    """An MLflow call that fails during a run (its server went away): one line, not five chained
    tracebacks; finished stages stay in the store, a rerun reuses them."""
    try:
        yield
    except MedpipeError:
        raise
    except Exception as e:  # noqa: BLE001 - mlflow raises its own and requests' errors
        raise MedpipeError(f"tracking: mlflow at {os.environ.get('MLFLOW_TRACKING_URI')}: {_first_line(e)} "
                           f"(finished stages are kept; rerun to continue)") from None


class PipelineTracker:
    def __init__(self, cfg: Any, run_dir: Path, resolved: dict):
        self.names = trackers(cfg)
        self.run_dir = run_dir
        self.group = run_dir.name
        self.mlflow = self.wandb = None
        self.parent_id = self.experiment_id = None
        self.child: dict[str, str] = {}
        self.summary: dict[str, Any] = {}
        self.ended = False
        if "mlflow" in self.names:
            self._start_mlflow(cfg, resolved)
        if "wandb" in self.names:
            self._start_wandb(cfg, resolved)

    # ---- MLflow ---------------------------------------------------------------------------------
    def _start_mlflow(self, cfg: Any, resolved: dict) -> None:
        try:
            self._start_mlflow_run(cfg, resolved)
        except Exception as e:  # noqa: BLE001 - mlflow raises its own and requests' errors
            raise MedpipeError(f"tracking: mlflow at {os.environ.get('MLFLOW_TRACKING_URI')}: "
                               f"{_first_line(e)}") from None

    def _start_mlflow_run(self, cfg: Any, resolved: dict) -> None:
        from mlflow.tracking import MlflowClient

        uri = mlflow_uri(cfg)
        os.environ["MLFLOW_TRACKING_URI"] = uri
        os.environ.pop("MLFLOW_RUN_ID", None)  # never resume someone else's run
        experiment = os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", f"medpipe-{cfg.name}")
        client = MlflowClient(uri)
        found = client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        parent = client.create_run(self.experiment_id, run_name=self.group,
                                   tags={"medpipe.run_dir": str(self.run_dir), "medpipe.recipe": str(cfg.name)})
        self.mlflow, self.parent_id = client, parent.info.run_id
        from mlflow.entities import Param

        params = [Param(k[:250], v[:6000]) for k, v in _flat(resolved).items()]
        for i in range(0, len(params), 100):
            client.log_batch(self.parent_id, params=params[i:i + 100])
        if (self.run_dir / "config.yaml").is_file():
            client.log_artifact(self.parent_id, str(self.run_dir / "config.yaml"))

    # ---- W&B ------------------------------------------------------------------------------------
    def _start_wandb(self, cfg: Any, resolved: dict) -> None:
        """Stage runs join the group through the environment; the `pipeline` run is written at the
        end (an in-process stage's wandb.init would otherwise finish or take over an open one)."""
        os.environ.setdefault("WANDB_PROJECT", f"medpipe-{cfg.name}")
        os.environ.setdefault("WANDB_DIR", str(self.run_dir))
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ["WANDB_RUN_GROUP"] = self.group
        self.wandb_config = resolved
        self.wandb = True

    # ---- per stage ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def stage(self, name: str, kind: str, store_dir: Path) -> Iterator[None]:
        """Environment for one stage's trainer (this process and the launcher's ranks inherit it)."""
        env = {STAGE_ENV: ",".join(self.names), "MEDPIPE_RUN_NAME": name}
        if self.mlflow is not None:
            with mlflow_errors():
                child = self.mlflow.create_run(self.experiment_id, run_name=name, tags={
                    "mlflow.parentRunId": self.parent_id, "medpipe.stage": name, "medpipe.kind": kind})
            self.child[name] = child.info.run_id
            env["MLFLOW_RUN_ID"] = child.info.run_id
        if self.wandb:
            env.update(WANDB_NAME=name, WANDB_JOB_TYPE=kind, WANDB_RUN_GROUP=self.group)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        ok = False
        try:
            yield
            ok = True
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            self._close_stage_runs(name, ok)

    def _close_stage_runs(self, name: str, ok: bool) -> None:
        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.run.finish(exit_code=0 if ok else 1)  # an in-process stage's run (the callback leaves it open)
        if self.mlflow is not None and not ok and name in self.child:
            with contextlib.suppress(Exception):   # the stage's own error is the one to report
                self.mlflow.set_terminated(self.child[name], "FAILED")
                self.end(ok=False)

    def stage_done(self, name: str, kind: str, art: Any, store_dir: Path, reused: bool = False) -> None:
        """Every stage's metrics and artifact paths, on its child run and on the pipeline run."""
        metrics = _numbers(art.metrics or {})
        paths = {f"path.{k}": str(v) for k, v in (("store_dir", store_dir), ("model", art.model_path),
                                                   ("merged", art.merged_path), ("dataset", art.dataset_path))
                 if v}
        self.summary.update({f"{name}/{k}": v for k, v in metrics.items()})
        if self.mlflow is not None:
            with mlflow_errors():
                self._mlflow_stage_done(name, kind, metrics, paths, reused)
        self.summary.update({f"{name}/{k}": v for k, v in paths.items()})

    def _mlflow_stage_done(self, name: str, kind: str, metrics: dict, paths: dict, reused: bool) -> None:
        import time

        from mlflow.entities import Metric, RunTag

        ms = int(time.time() * 1000)
        if name not in self.child:  # reused: a child that records where the result came from
            self.child[name] = self.mlflow.create_run(self.experiment_id, run_name=name, tags={
                "mlflow.parentRunId": self.parent_id, "medpipe.stage": name, "medpipe.kind": kind}).info.run_id
        child = self.child[name]
        tags = [RunTag(k, v) for k, v in paths.items()] + [RunTag("medpipe.reused", str(reused).lower())]
        self.mlflow.log_batch(child, metrics=[Metric(f"final_{k}", v, ms, 0) for k, v in metrics.items()],
                              tags=tags)
        self.mlflow.set_terminated(child, "FINISHED")
        self.mlflow.log_batch(self.parent_id, tags=[RunTag(f"{name}.{k}", v) for k, v in paths.items()],
                              metrics=[Metric(f"{name}.{k}", v, ms, 0) for k, v in metrics.items()])

    def end(self, ok: bool = True) -> None:
        if self.ended:
            return
        self.ended = True
        if self.mlflow is not None:
            with mlflow_errors():
                self.mlflow.set_terminated(self.parent_id, "FINISHED" if ok else "FAILED")
        if self.wandb:
            import wandb

            run = wandb.init(name="pipeline", job_type="pipeline", group=self.group, config=self.wandb_config,
                             dir=os.environ["WANDB_DIR"])
            run.summary.update(self.summary)
            run.finish(exit_code=0 if ok else 1)
