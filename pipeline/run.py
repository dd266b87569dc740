"""The pipeline driver: run dir, stage identities, skip/resume, the stage loop (entry state, locks
and status files: medpipe.store). Over 400 lines: the Pipeline class is the one stage loop.

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
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from . import launch, tracking
from .artifact import (Artifact, ArtifactError, check_files, merged_view, model_fingerprint, stable_hash, stage_key,
                       write_json_atomic, write_text_atomic)
from .compose import StagePlan
from .entry import STAGE_FILE
from .errors import ConfigError, MedpipeError
from .params import GlobalBatch
from .store import (RUN_FILE, STATUS_FILE, StageLock, _earlier_attempts, _reserve_space, now,  # noqa: F401
                    os_error_message, read_run_file, read_status, stage_table, write_status)

@dataclass
class Keyed:
    plan: StagePlan
    config_hash: str
    inputs_hash: str
    store_dir: Path
    data: dict = dataclasses.field(default_factory=dict)  # data fingerprints (part of the inputs hash)

    @property
    def key(self) -> str:
        return stage_key(self.config_hash, self.inputs_hash)


def keyed_by(keyed: list[Keyed], name: str) -> Keyed:
    return next(k for k in keyed if k.plan.name == name)


def runs_root(cfg: Any) -> Path:
    return Path(cfg.run.root).expanduser()


def store_root(cfg: Any) -> Path:
    return Path(cfg.run.store).expanduser() if cfg.run.get("store") else runs_root(cfg) / ".store"


def data_specs(params: Any) -> dict[str, Any]:
    """Params fields that name data (`data`, `*_data`): fingerprinted into the inputs hash."""
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)
            if (f.name == "data" or f.name.endswith("_data")) and getattr(params, f.name) is not None}


def fingerprint_data(spec: Any) -> str:
    from .data import fingerprint

    return fingerprint(spec)


def plan_keys(cfg: Any, plans: list[StagePlan], base_id: str) -> list[Keyed]:
    """Stage identities, computable before anything runs: each input is the key of the stage
    it reads from (or the base model's fingerprint), so keys chain like a Merkle list."""
    from omegaconf import OmegaConf

    model_opts = OmegaConf.to_container(cfg.model, resolve=True)
    model_opts = {k: model_opts.get(k) for k in ("trust_remote_code", "dtype", "attn_implementation")}
    keyed: dict[str, Keyed] = {}
    out = []
    for plan in plans:
        config_hash = stable_hash({"kind": plan.kind, "params": plan.raw, "seed": cfg.seed, "model": model_opts})
        data = {name: fingerprint_data(spec) for name, spec in data_specs(plan.params).items()}
        k = Keyed(plan, config_hash, "", Path(), data)
        source = base_id
        if plan.source:  # the upstream's content if it is done, else its key (rekeyed once it is)
            up = keyed[plan.source]
            source = upstream_identity(_loaded(up.store_dir) if is_done(up) else None) or f"key:{up.key}"
        rekey(cfg, k, source)
        keyed[plan.name] = k
        out.append(k)
    return out


def upstream_identity(art: Artifact | None) -> str | None:
    """What a stage's inputs hash says about the stage it reads from: the digest of the files that
    stage handed on, so other weights under the same upstream key (a forced, non-reproducing
    rerun) give other keys downstream, and reproduced weights the same ones."""
    return f"content:{art.content_digest}" if art is not None and art.content_digest else None


def rekey(cfg: Any, k: Keyed, source: str) -> None:
    k.inputs_hash = stable_hash({"input": source, "data": k.data})
    k.store_dir = store_root(cfg) / f"{k.plan.kind}-{k.key}"


def _loaded(sdir: Path) -> Artifact | None:
    try:
        return Artifact.load(sdir)
    except ArtifactError:
        return None


def reuse_problem(k: Keyed, full: bool = False) -> str | None:
    """Why the finished entry at k.store_dir cannot be reused ("FILE: why"), or None when it can.
    An entry without artifact.json is simply not done (None too; check is_done)."""
    if not Artifact.exists(k.store_dir):
        return None
    try:
        art = Artifact.load(k.store_dir)
    except ArtifactError as e:
        return str(e)
    if art.config_hash != k.config_hash or art.inputs_hash != k.inputs_hash:
        return f"{k.store_dir / 'artifact.json'}: records another config or inputs than this stage's"
    problems = check_files(art, k.store_dir, full=full)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return problems[0] + more
    return None


def is_done(k: Keyed, full: bool = False) -> bool:
    return Artifact.exists(k.store_dir) and reuse_problem(k, full) is None


def link(run_dir: Path, name: str, target: Path) -> None:
    """Point run_dir/name at a store entry (relative link, replaced atomically)."""
    dest = run_dir / name
    tmp = run_dir / f".{name}.link"
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, run_dir), tmp)
    os.replace(tmp, dest)


def stage_dir_name(plan: StagePlan) -> str:
    return f"{plan.index + 1:02d}-{plan.name}"


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


def require_model_path(cfg: Any) -> None:
    from omegaconf import OmegaConf

    if OmegaConf.is_missing(cfg.model, "path"):
        raise ConfigError(f"model.path is required for model={cfg.model.get('name', '?')}: "
                          f"set model.path=/path/to/the/checkpoint")


def _model_opts(cfg: Any) -> dict:
    from omegaconf import OmegaConf

    require_model_path(cfg)
    return OmegaConf.to_container(cfg.model, resolve=True)


def base_identity(cfg: Any) -> str:
    """Identity of the recipe's model, cheap (no model is built or loaded): a model source's
    identity (the tiny model's spec hash, a GGUF file's digest), or a directory's fingerprint."""
    from . import registry

    model = _model_opts(cfg)
    if model.get("path") is None:
        source = model.get("source") or "tiny"
        return f"{source}-" + registry.model_source(source).identity(model)
    return model_fingerprint(Path(model["path"]).expanduser())


def base_artifact(cfg: Any) -> Artifact:
    """The recipe's model as the first stage's input (a model source builds or converts it once)."""
    from . import registry

    model = _model_opts(cfg)
    if model.get("path") is None:
        path = str(registry.model_source(model.get("source") or "tiny").materialize(model))
    else:
        path = str(Path(model["path"]).expanduser())
        if not Path(path).is_dir() and not model.get("allow_hub", False):
            raise ConfigError(f"model.path '{model['path']}' does not exist (set model.allow_hub=true to let "
                              f"transformers resolve it as a Hub id)")
        # checked here, before any stage, whatever the first stage's kind (a tokenizer alone would
        # pass every data check and fail at training as "Unrecognized model")
        if Path(path).is_dir() and not any(Path(path).iterdir()):
            raise ConfigError(f"model.path {path}: the directory is empty (no model was saved there)")
        if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
            raise ConfigError(f"model.path {path}: no config.json (a tokenizer alone is not a model; point "
                              f"model.path at the checkpoint directory)")
    return Artifact(stage="base", kind="model", format="full", model_path=path, tokenizer_path=path,
                    trust_remote_code=bool(model.get("trust_remote_code", False)))


class Pipeline:
    """Runs the stages of one composed recipe, in order, in this (driver) process."""

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

    def run(self, force: bool = False, from_stage: str | None = None, only: str | None = None) -> Path:
        from omegaconf import OmegaConf

        rerun = self.selected(force, from_stage, only)
        base = base_artifact(self.cfg)
        keyed = plan_keys(self.cfg, self.plans, base_identity(self.cfg))
        self.check_data(base)
        run_dir = prepare_run_dir(self.cfg, self.recipe)
        write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(self.cfg, resolve=True))
        self.write_run_file(run_dir, keyed)
        tracker = tracking.PipelineTracker(self.cfg, run_dir, OmegaConf.to_container(self.cfg, resolve=True))
        self.console.print(f"[bold]medpipe[/] run [cyan]{self.cfg.name}[/] → {run_dir}")
        done: dict[str, Artifact] = {}
        broken: dict[str, str] = {}
        verify = str(self.cfg.run.get("verify") or "size")
        if verify not in ("size", "full"):
            raise ConfigError(f"run.verify: must be size or full, got {verify!r}")
        full = verify == "full"
        total = len(keyed)
        current = None
        try:
            for k in keyed:
                plan = current = k.plan
                if plan.source and plan.source in done:  # inputs = the content the upstream really handed on
                    rekey(self.cfg, k, upstream_identity(done[plan.source]) or f"key:{keyed_by(keyed, plan.source).key}")
                    self.write_run_file(run_dir, keyed)
                problem = reuse_problem(k, full)
                if only is not None and plan.name != only:
                    if Artifact.exists(k.store_dir) and problem is None:
                        done[plan.name] = self.use(k, run_dir)
                    elif problem:
                        broken[plan.name] = problem
                    continue
                started = time.monotonic()
                self.console.rule(f"Stage {plan.index + 1}/{total} · {plan.name} ({plan.kind})")
                if Artifact.exists(k.store_dir) and problem is None and plan.name not in rerun:
                    self.console.print(f"  [green]✓ reused[/] (same config and inputs) {k.store_dir}", soft_wrap=True)
                    done[plan.name] = self.use(k, run_dir)
                    tracker.stage_done(plan.name, plan.kind, done[plan.name], k.store_dir, reused=True)
                    continue
                if problem:
                    self.console.print(f"  [red]✗ not reusable:[/] {problem}; retraining", soft_wrap=True)
                source = done.get(plan.source) if plan.source else base
                if source is None:
                    why = f" ({broken[plan.source]})" if plan.source in broken else ""
                    raise MedpipeError(f"stage {plan.name} needs the output of '{plan.source}', which is not done{why}; "
                                       f"run without --only first")
                with tracker.stage(plan.name, plan.kind, k.store_dir):
                    self.train(k, source, run_dir)
                done[plan.name] = self.use(k, run_dir)
                tracker.stage_done(plan.name, plan.kind, done[plan.name], k.store_dir)
                self.console.print(f"  [green]✓[/] {plan.name} finished in {_fmt(time.monotonic() - started)}"
                                   f"  {_metrics_line(done[plan.name].metrics)}", soft_wrap=True)
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
    def use(k: Keyed, run_dir: Path) -> Artifact:
        """A finished stage becomes part of this run: linked from the run dir, its artifact returned."""
        link(run_dir, stage_dir_name(k.plan), k.store_dir)
        return Artifact.load(k.store_dir)

    def check_data(self, base: Artifact) -> None:
        """Validate every stage's data before the first stage trains."""
        from .cluster_values import check_launcher
        from .store import check_places
        from .data import DataError

        from omegaconf import OmegaConf

        launcher = OmegaConf.to_container(self.cfg.launcher, resolve=True)
        check_launcher(launcher)   # counts, ports, sbatch values: one line naming the key
        check_places(self.cfg)     # run dir and store writable
        tracking.check_trackers(self.cfg)   # each configured tracker answers (short timeout)
        world = launch.planned_world_size(launcher)
        self.check_memory(base)
        for plan in self.plans:
            if isinstance(plan.params, GlobalBatch) and plan.cls.trains:
                try:  # the global batch must divide over the launcher's ranks: fail before anything trains
                    plan.params.batch_layout(world)
                except ValueError as e:
                    raise ConfigError(f"stages.{plan.name}: {e}") from None
            if hasattr(plan.params, "data") and plan.params.data is None:
                raise ConfigError(f"stages.{plan.name}.data: required (a path, a conf/data entry such as "
                                  f"${{data.sft}}, or a list of sources)")
            try:
                lines = plan.cls().check(plan.params, base, self.global_data()) or []
            except (DataError, MedpipeError) as e:
                raise MedpipeError(f"stages.{plan.name}: {e}") from None
            if not lines:  # a kind without data to check (StageKind.check's default)
                continue
            self.console.print(f"[bold]{plan.name}[/] data:")
            for line in lines:
                self.console.print(f"  {line}", soft_wrap=True)

    def check_memory(self, base: Artifact) -> None:
        """A kind that cannot run under the chosen ZeRO stage, or a stage whose memory estimate
        exceeds the GPU's (medpipe.memplan): one line naming the knob, before anything trains."""
        from . import memplan

        for problem in (memplan.zero3_refusal(self.cfg, self.plans),
                        memplan.refusal(self.cfg, self.plans, base.model_path)):
            if problem:
                raise ConfigError(problem)

    def global_data(self) -> dict:
        from omegaconf import OmegaConf

        return OmegaConf.to_container(self.cfg.data, resolve=True) if "data" in self.cfg else {}

    def train(self, k: Keyed, source: Artifact, run_dir: Path) -> None:
        from omegaconf import OmegaConf

        plan = k.plan
        sdir = k.store_dir
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
        launcher = OmegaConf.to_container(self.cfg.launcher, resolve=True)
        if launcher["name"] != "local" and launcher.get("deepspeed", True) and plan.cls.trains:
            ds = OmegaConf.to_container(self.cfg.deepspeed, resolve=True)
            write_json_atomic(sdir / launch.DEEPSPEED_FILE, launch.deepspeed_config(ds, plan.params))
            launcher["deepspeed_config"] = str(sdir / launch.DEEPSPEED_FILE)
        if not plan.cls.trains:
            launcher = {"name": "local"}
        stage_file = sdir / STAGE_FILE
        write_json_atomic(stage_file, {
            "name": plan.name, "kind": plan.kind, "index": plan.index, "total": len(self.plans),
            "params": plan.raw, "input": dataclasses.asdict(model_in), "output_dir": str(sdir),
            "model": OmegaConf.to_container(self.cfg.model, resolve=True), "data": self.global_data(),
            "seed": int(self.cfg.seed), "launcher": launcher,
            "config_hash": k.config_hash, "inputs_hash": k.inputs_hash,
        })
        link(run_dir, stage_dir_name(plan), sdir)
        with StageLock(sdir):
            for tmp in sdir.glob(".*.tmp"):  # half-written files of an attempt killed mid-write
                tmp.unlink(missing_ok=True)
            previous = read_status(sdir)
            if previous.get("state") in ("interrupted", "failed", "broken"):
                self.console.print("  resuming an interrupted stage from its last checkpoint")
            earlier = _earlier_attempts(sdir, previous)
            try:
                write_status(sdir, state="running", pid=os.getpid(), host=socket.gethostname(), started=now(),
                             ended=None, error=None, run_dir=str(run_dir), attempts=earlier,
                             elapsed=sum(earlier))
                reserve = _reserve_space(sdir)
            except OSError as e:
                raise MedpipeError(os_error_message(plan.name, sdir, e)) from None
            t0 = time.monotonic()

            def ended(state: str, **fields: Any) -> None:
                took = time.monotonic() - t0
                write_status(sdir, state=state, ended=now(), attempts=earlier + [took], elapsed=sum(earlier) + took,
                             **fields)

            try:
                launch.run(launcher, stage_file, sdir / "launcher.log")
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

    def write_run_file(self, run_dir: Path, keyed: list[Keyed]) -> None:
        write_json_atomic(run_dir / RUN_FILE, {
            "name": self.cfg.name, "recipe": self.recipe, "created": now(),
            "stages": [{"name": k.plan.name, "kind": k.plan.kind, "link": stage_dir_name(k.plan),
                        "store_dir": str(k.store_dir.resolve()), "key": k.key} for k in keyed],
        })


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _metrics_line(metrics: dict) -> str:
    keys = ["first_loss", "last_loss", "reward_accuracy", "accuracy"]
    keys += sorted(k for k in metrics if k.endswith("/acc"))  # eval stages: accuracy per eval set
    shown = [f"{k}={metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), (int, float))]
    return " ".join(shown)
