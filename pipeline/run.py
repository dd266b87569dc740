"""The pipeline driver: the run plan (medpipe.plan) executed: the run dir, skip/resume, the stage
loop (entry state, locks and status files: medpipe.store).

A stage's identity is (config hash, inputs hash); its result lives in a content-addressed store
(`<run.root>/.store/<kind>-<key>/` by default) and a run dir links `NN-<stage>` to the entries it
used. So rerunning a command skips finished stages, an interrupted stage resumes from the
Trainer checkpoints in its store entry, a changed hyperparameter changes that stage's key and so
every later key, and a sweep trains shared earlier stages once. Deleting a run dir deletes links only.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from . import launch, tracking
from .artifact import Artifact, merged_view, write_json_atomic, write_text_atomic
from .compose import StagePlan
from .entry import STAGE_FILE
from .errors import ConfigError, MedpipeError
from .plan import PlannedStage, RunPlan, build_plan, check_plan, global_data, runs_root
from .store import (RUN_FILE, StageLock, earlier_attempts, now, os_error_message, read_status, reserve_space,
                    write_status)


def link(run_dir: Path, name: str, target: Path) -> None:
    """Point run_dir/name at a store entry (relative link, replaced atomically)."""
    dest = run_dir / name
    tmp = run_dir / f".{name}.link"
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, run_dir), tmp)
    os.replace(tmp, dest)


def prepare_run_dir(cfg: Any, recipe: str) -> Path:
    if cfg.run.get("dir"):
        run_dir = Path(cfg.run.dir).expanduser()
    else:  # a fresh dir per run, also for several runs within one second (sweeps)
        stem = runs_root(cfg) / f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        run_dir, n = stem, 1
        while run_dir.exists():
            run_dir, n = stem.with_name(f"{stem.name}-{n}"), n + 1
    existing = run_dir / RUN_FILE
    if existing.exists():
        other = json.loads(existing.read_text())
        if other.get("name") != cfg.name:
            raise ConfigError(f"run dir {run_dir} holds a run of recipe '{other.get('name')}', not '{cfg.name}'; "
                              f"choose another run.dir")
    elif run_dir.exists() and any(p for p in run_dir.iterdir() if not p.name.startswith(".")):
        raise ConfigError(f"run dir {run_dir} exists and is not a medpipe run dir; choose another run.dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def write_run_file(run_dir: Path, plan: RunPlan, recipe: str) -> None:
    write_json_atomic(run_dir / RUN_FILE, plan.run_file(recipe))


class Pipeline:
    """Runs the stages of one composed recipe, in order, in this (driver) process: the run plan
    (medpipe.plan) executed."""

    def __init__(self, cfg: Any, plans: list[StagePlan], recipe: str, console: Any, overrides: list[str] | None = None):
        self.cfg, self.plans, self.recipe, self.console = cfg, plans, recipe, console
        self.overrides = list(overrides or [])  # for the resume command printed after Ctrl-C

    def selected(self, force: bool, from_stage: str | None, only: str | None) -> set[str]:
        """Names of stages that must (re)train even if a matching artifact exists."""
        names = [p.name for p in self.plans]
        for flag, value in (("--from", from_stage), ("--only", only)):
            if value is not None and value not in names:
                raise ConfigError(f"{flag} {value}: no such stage (stages: {', '.join(names)})")
        if force:
            return set(names) if only is None else {only}
        if only is not None:
            return {only}
        if from_stage is not None:
            return set(names[names.index(from_stage):])
        return set()

    def plan(self) -> RunPlan:
        """The run plan, checked: everything `run` refuses is refused here, before anything is written."""
        plan = build_plan(self.cfg, self.plans, build_base=True, identify=True,
                          verify=str(self.cfg.run.get("verify") or "size"))
        check_plan(plan, self.console)
        return plan

    def run(self, force: bool = False, from_stage: str | None = None, only: str | None = None) -> Path:
        from omegaconf import OmegaConf

        rerun = self.selected(force, from_stage, only)
        plan = self.plan()
        run_dir = prepare_run_dir(self.cfg, self.recipe)
        write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(self.cfg, resolve=True))
        write_run_file(run_dir, plan, self.recipe)
        tracker = tracking.PipelineTracker(self.cfg, run_dir, OmegaConf.to_container(self.cfg, resolve=True))
        self.console.print(f"[bold]medpipe[/] run [cyan]{self.cfg.name}[/] → {run_dir}")
        done: dict[str, Artifact] = {}
        broken: dict[str, str] = {}
        total = len(plan.stages)
        current = None
        try:
            for st in plan.stages:
                stage = current = st.stage
                if plan.follow(st, done):  # its input is other content than the plan saw: new key
                    write_run_file(run_dir, plan, self.recipe)
                if only is not None and stage.name != only:
                    if st.reusable:
                        done[stage.name] = self.use(st, run_dir)
                    elif st.problem:
                        broken[stage.name] = st.problem
                    continue
                started = time.monotonic()
                self.console.rule(f"Stage {stage.index + 1}/{total} · {stage.name} ({stage.kind})")
                if st.reusable and stage.name not in rerun:
                    self.console.print(f"  [green]✓ reused[/] (same config and inputs) {st.store_dir}", soft_wrap=True)
                    done[stage.name] = self.use(st, run_dir)
                    tracker.stage_done(stage.name, stage.kind, done[stage.name], st.store_dir, reused=True)
                    continue
                if st.problem:
                    self.console.print(f"  [red]✗ not reusable:[/] {st.problem}; retraining", soft_wrap=True)
                source = done.get(stage.source) if stage.source else plan.base
                if source is None:
                    why = f" ({broken[stage.source]})" if stage.source in broken else ""
                    raise MedpipeError(f"stage {stage.name} needs the output of '{stage.source}', which is not done{why}; "
                                       f"run without --only first")
                with tracker.stage(stage.name, stage.kind, st.store_dir):
                    self.train(st, source, run_dir)
                done[stage.name] = st.artifact = Artifact.load(st.store_dir)
                tracker.stage_done(stage.name, stage.kind, done[stage.name], st.store_dir)
                self.console.print(f"  [green]✓[/] {stage.name} finished in {_fmt(time.monotonic() - started)}"
                                   f"  {_metrics_line(done[stage.name].metrics)}", soft_wrap=True)
        except KeyboardInterrupt:
            if current is not None:
                self.console.print(f"\n[yellow]stage {current.name} interrupted[/]; its checkpoints are kept. Resume with:\n"
                                   f"  {self.resume_command(run_dir, current, force, from_stage, only)}", soft_wrap=True)
            raise
        tracker.end()
        self.console.print(f"[bold green]Pipeline {self.cfg.name} complete[/] → {run_dir}")
        return run_dir

    def resume_command(self, run_dir: Path, stage: StagePlan, force: bool, from_stage: str | None,
                       only: str | None) -> str:
        """The command that carries on where Ctrl-C stopped: the same recipe and overrides in the same
        run dir, the interrupted stage resuming from its checkpoints (so never --force on it)."""
        import shlex

        args = [f"recipe={self.recipe}"] + [o for o in self.overrides if not o.startswith("run.dir=")]
        args.append(f"run.dir={run_dir}")
        names = [p.name for p in self.plans]
        later = names[names.index(stage.name) + 1:]
        if only is not None:
            args += ["--only", only]
        elif (force or from_stage is not None) and later:
            args += ["--from", later[0]]  # the stages after it still retrain, as asked
        return "medpipe run " + shlex.join(args)

    @staticmethod
    def use(st: PlannedStage, run_dir: Path) -> Artifact:
        """A finished stage becomes part of this run: linked from the run dir, its artifact (loaded
        when the plan was made) returned."""
        assert st.artifact is not None
        link(run_dir, st.link, st.store_dir)
        return st.artifact

    def train(self, st: PlannedStage, source: Artifact, run_dir: Path) -> None:
        from omegaconf import OmegaConf

        plan = st.stage
        sdir = st.store_dir
        if Artifact.exists(sdir):  # forced rerun or a broken entry: keep it beside, never delete it
            kept = stem = sdir.with_name(f"{sdir.name}.replaced-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
            n = 1
            while kept.exists():
                kept, n = stem.with_name(f"{stem.name}-{n}"), n + 1
            os.replace(sdir, kept)
            self.console.print(f"  previous result kept at {kept}")
        sdir.mkdir(parents=True, exist_ok=True)
        model_in = merged_view(source)
        if plan.source is None and plan.index == 0:
            self.console.print(f"  input model: {model_in.model_path}")
        if st.deepspeed is not None:
            write_json_atomic(sdir / launch.DEEPSPEED_FILE, st.deepspeed)
        stage_file = sdir / STAGE_FILE
        write_json_atomic(stage_file, {
            "name": plan.name, "kind": plan.kind, "index": plan.index, "total": len(self.plans),
            "params": plan.raw, "input": dataclasses.asdict(model_in), "output_dir": str(sdir),
            "model": OmegaConf.to_container(self.cfg.model, resolve=True), "data": global_data(self.cfg),
            "seed": int(self.cfg.seed), "launcher": st.launcher,
            "config_hash": st.config_hash, "inputs_hash": st.inputs_hash,
        })
        link(run_dir, st.link, sdir)  # the run dir shows the running stage (and, after, its result)
        with StageLock(sdir):
            for tmp in sdir.glob(".*.tmp"):  # half-written files of an attempt killed mid-write
                tmp.unlink(missing_ok=True)
            previous = read_status(sdir)
            if previous.get("state") in ("interrupted", "failed", "broken"):
                self.console.print("  resuming an interrupted stage from its last checkpoint")
            earlier = earlier_attempts(sdir, previous)
            try:
                write_status(sdir, state="running", pid=os.getpid(), host=socket.gethostname(), started=now(),
                             ended=None, error=None, run_dir=str(run_dir), attempts=earlier,
                             elapsed=sum(earlier))
                reserve = reserve_space(sdir)
            except OSError as e:
                raise MedpipeError(os_error_message(plan.name, sdir, e)) from None
            t0 = time.monotonic()

            def ended(state: str, **fields: Any) -> None:
                took = time.monotonic() - t0
                write_status(sdir, state=state, ended=now(), attempts=earlier + [took], elapsed=sum(earlier) + took,
                             **fields)

            try:
                launch.run(st.launcher, stage_file, sdir / "launcher.log", planned=st.launch)
                if not Artifact.exists(sdir):
                    raise MedpipeError(f"stage {plan.name} ended without writing {sdir}/artifact.json")
            except KeyboardInterrupt:
                reserve.unlink(missing_ok=True)
                ended("interrupted")
                raise
            except BaseException as e:
                reserve.unlink(missing_ok=True)  # room for the status on a full disk
                message = os_error_message(plan.name, sdir, e)
                ended("failed", error=(message or str(e) or type(e).__name__).splitlines()[0])
                if message:
                    raise MedpipeError(message) from None
                raise
            reserve.unlink(missing_ok=True)
            ended("done")


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _metrics_line(metrics: dict) -> str:
    keys = ["first_loss", "last_loss", "reward_accuracy", "accuracy"]
    keys += sorted(k for k in metrics if k.endswith("/acc"))  # eval stages: accuracy per eval set
    shown = [f"{k}={metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), (int, float))]
    return " ".join(shown)
