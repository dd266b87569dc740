"""The run plan: what a run will do, worked out once before anything executes.

`build_plan` gives the base model's identity, and per stage its key (config hash + inputs hash) and
store entry, whether a finished entry there is reused (its artifact loaded once), how its global
batch splits over the launcher's ranks, the launcher it runs under and its launch command, and its
memory estimate per GPU (medpipe.memplan). `medpipe run` executes the plan (medpipe.run), `show`
prints it, `validate` checks it (`check_plan`), `submit` writes its run file and batch script.

Keys chain like a Merkle list: a stage's inputs hash names what it reads, the base model's
fingerprint or the content digest of the upstream's finished entry (its key while the upstream is
not done). When the driver finishes a stage, `RunPlan.follow` re-identifies the stages that read
it from the content it really handed on. Only engine and data imports here (no torch): show and
validate build the plan too.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import launch
from .artifact import Artifact, ArtifactError, check_files, model_fingerprint, stable_hash, stage_key
from .entry import STAGE_FILE
from .errors import ConfigError, MedpipeError
from .params import GlobalBatch
from .store import now, read_status

if TYPE_CHECKING:
    from .compose import StagePlan

VERIFY = ("size", "full")  # run.verify: how a finished entry's files are checked before reuse


@dataclass
class PlannedStage:
    """One stage as the run will treat it. `stage` is the bound config (name, kind, cls, params);
    the identity fields are empty on a plan built without identities (`validate`)."""

    stage: StagePlan
    batch: str | None = None        # "global batch 8 = 1 per device × ...", training stages only
    batch_error: str | None = None  # why the global batch cannot split over the ranks
    memory: Any = None              # its medpipe.memplan.StageMemory (per GPU), training stages only
    config_hash: str = ""
    data: dict = dataclasses.field(default_factory=dict)  # data fingerprints (part of the inputs hash)
    input_identity: str = ""   # what the inputs hash says about the input (base id, content:…, key:…)
    inputs_hash: str = ""
    store_dir: Path = Path()
    launcher: dict = dataclasses.field(default_factory=dict)  # as written into stage.json
    deepspeed: dict | None = None      # the stage's DeepSpeed JSON, when its launcher takes one
    launch: list[str] | None = None    # the command that starts it; None = inside the driver
    artifact: Artifact | None = None   # the finished entry at store_dir, when it can be reused
    problem: str | None = None         # why the finished entry at store_dir cannot be reused
    resumes: bool = False              # an interrupted or failed attempt left checkpoints there

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def key(self) -> str:
        return stage_key(self.config_hash, self.inputs_hash)

    @property
    def link(self) -> str:
        """The run dir's name for the stage (a link to its store entry)."""
        return f"{self.stage.index + 1:02d}-{self.stage.name}"

    @property
    def reusable(self) -> bool:
        return self.artifact is not None


@dataclass
class RunPlan:
    cfg: Any
    stages: list[PlannedStage]
    launcher: dict      # the recipe's launcher, resolved
    world: int          # ranks a training stage runs on
    base: Artifact | None   # the first stage's input, when built (run, validate, submit)
    verify: str = "size"
    base_id: str | None = None   # its identity, when the stages were identified (run, show, submit)
    memories: list = dataclasses.field(default_factory=list)  # memplan.StageMemory of each training stage
    memory_from: str | None = None  # where the model's shape came from (None: unknown)
    refusals: list[str] = dataclasses.field(default_factory=list)  # a stage refused by the memory plan

    def stage(self, name: str) -> PlannedStage:
        return next(s for s in self.stages if s.name == name)

    def follow(self, st: PlannedStage, done: dict[str, Artifact]) -> bool:
        """Before `st` runs: its inputs hash names the content its upstream really handed on in this
        run (a retrained upstream may differ from what the plan saw). True when its key changed."""
        source = st.stage.source
        if source is not None and source in done:
            identity = upstream_identity(done[source]) or f"key:{self.stage(source).key}"
            if identity != st.input_identity:
                self._identify(st, identity)
                return True
        if st.artifact is None and st.problem is None and Artifact.exists(st.store_dir):
            # another run sharing the store finished this entry since the plan was made
            st.artifact, st.problem = inspect_entry(st, full=self.verify == "full")
        return False

    def run_file(self, recipe: str) -> dict:
        """run.json: which store entry each stage of the run dir uses (`medpipe status` reads it)."""
        return {"name": self.cfg.name, "recipe": recipe, "created": now(),
                "stages": [{"name": s.name, "kind": s.stage.kind, "link": s.link,
                            "store_dir": str(s.store_dir.resolve()), "key": s.key} for s in self.stages]}

    def stage_lines(self) -> list[str]:
        """Each stage's input, what happens to it (reused / resumed / trained, where), how its global
        batch splits over the ranks and, under a distributed launcher, the command that starts it."""
        import shlex

        lines = ["# stages (in order):"]
        model = self.cfg.model.path or model_label(self.cfg.model)
        for st in self.stages:
            p = st.stage
            source = f"stage '{p.source}'" if p.source else f"model {model}"
            if st.reusable:
                state = f"reuse finished result {st.store_dir}"
            elif st.resumes:
                state = f"resume from last checkpoint in {st.store_dir}"
            else:
                state = f"train → {st.store_dir}"
            lines.append(f"#  {st.link} [{p.kind}] input: {source}; {state}")
            if st.batch is not None:
                lines.append(f"#     batch: {st.batch}")
            elif st.batch_error is not None:  # `run` refuses this before anything trains; show says why
                lines.append(f"#     batch: global batch {p.params.batch_size} CANNOT run on this launcher: "
                             f"{st.batch_error}")
            if st.launch is not None:
                lines.append(f"#     launch: {shlex.join(st.launch)}")
        return lines

    def memory_lines(self) -> list[str]:
        """The per-GPU memory plan of every training stage, and what validate/run refuse."""
        from . import memplan

        return memplan.lines(self.cfg, self.memories, self.memory_from) + \
            [f"#  REFUSED by validate/run: {problem}" for problem in self.refusals]

    def _identify(self, st: PlannedStage, input_identity: str) -> None:
        """Key, store entry, launcher and launch command from the stage's input; then what the
        store holds there (the finished artifact loaded once, or why it cannot be reused)."""
        st.input_identity = input_identity
        st.inputs_hash = stable_hash({"input": input_identity, "data": st.data})
        st.store_dir = store_root(self.cfg) / f"{st.stage.kind}-{st.key}"
        st.launcher, st.deepspeed = stage_launcher(self.cfg, self.launcher, st.stage, st.store_dir)
        st.launch = launch.command(st.launcher, st.store_dir / STAGE_FILE)
        st.artifact, st.problem = inspect_entry(st, full=self.verify == "full")
        st.resumes = (st.artifact is None and not Artifact.exists(st.store_dir)
                      and read_status(st.store_dir).get("state") in ("interrupted", "failed"))


def build_plan(cfg: Any, plans: list[StagePlan], *, build_base: bool, identify: bool,
               verify: str = "size") -> RunPlan:
    """The plan of a composed recipe. build_base: build (or convert) the recipe's model and check
    its directory (run, validate, submit; `show` only reads its identity). identify: each stage's
    key and store entry (every data file is read to fingerprint it: validate lists missing ones
    first and checks without keys)."""
    from omegaconf import OmegaConf

    from . import memplan
    from .cluster_values import check_launcher

    if verify not in VERIFY:
        raise ConfigError(f"run.verify: must be size or full, got {verify!r}")
    base = base_artifact(cfg) if build_base else None
    stages = [PlannedStage(p) for p in plans]
    launcher = OmegaConf.to_container(cfg.launcher, resolve=True)
    check_launcher(launcher)  # counts, ports, sbatch values: one line naming the key
    plan = RunPlan(cfg, stages, launcher, launch.planned_world_size(launcher), base, verify)
    if identify:
        plan.base_id = base_identity(cfg)
        model_opts = OmegaConf.to_container(cfg.model, resolve=True)
        model_opts = {k: model_opts.get(k) for k in ("trust_remote_code", "dtype", "attn_implementation")}
        for st in stages:
            p = st.stage
            st.config_hash = stable_hash({"kind": p.kind, "params": p.raw, "seed": cfg.seed, "model": model_opts})
            st.data = {name: fingerprint_data(spec) for name, spec in data_specs(p.params).items()}
            source = plan.base_id
            if p.source:  # the upstream's content if it is done, else its key (followed once it is)
                up = plan.stage(p.source)
                source = upstream_identity(up.artifact) or f"key:{up.key}"
            plan._identify(st, source)
    for st in stages:
        if isinstance(st.stage.params, GlobalBatch) and st.stage.cls.trains:
            try:
                st.batch = st.stage.params.describe_batch(plan.world)
            except ValueError as e:
                st.batch_error = str(e)
    model_dir = base.model_path if base is not None else None
    plan.memories, plan.memory_from = memplan.plan_recipe(cfg, plans, model_dir)
    for m in plan.memories:
        plan.stage(m.stage).memory = m
    plan.refusals = [r for r in (memplan.zero3_refusal(cfg, plans),
                                 memplan.refusal(cfg, plans, model_dir, planned=(plan.memories, plan.memory_from)))
                     if r]
    return plan


def check_plan(plan: RunPlan, console: Any) -> None:
    """What `validate` checks and `run` refuses before anything trains: places writable, trackers
    answering, a stage refused by the memory plan, a global batch that does not divide, a stage
    without data, and each kind's own data check (its summary lines printed)."""
    from . import tracking
    from .data import DataError
    from .store import check_places

    data = global_data(plan.cfg)
    check_places(plan.cfg)     # run dir and store writable
    tracking.check_trackers(plan.cfg)   # each configured tracker answers (short timeout)
    if plan.refusals:
        raise ConfigError(plan.refusals[0])
    for st in plan.stages:
        p = st.stage
        if st.batch_error:
            raise ConfigError(f"stages.{p.name}: {st.batch_error}")
        if hasattr(p.params, "data") and p.params.data is None:
            raise ConfigError(f"stages.{p.name}.data: required (a path, a conf/data entry such as "
                              f"${{data.sft}}, or a list of sources)")
        try:
            lines = p.cls().check(p.params, plan.base, data) or []
        except (DataError, MedpipeError) as e:
            raise MedpipeError(f"stages.{p.name}: {e}") from None
        if not lines:  # a kind without data to check (StageKind.check's default)
            continue
        console.print(f"[bold]{p.name}[/] data:")
        for line in lines:
            console.print(f"  {line}", soft_wrap=True)


def global_data(cfg: Any) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg.data, resolve=True) if "data" in cfg else {}


def stage_launcher(cfg: Any, launcher: dict, stage: StagePlan, store_dir: Path) -> tuple[dict, dict | None]:
    """The launcher a stage runs under (a kind that does not train runs inside the driver) and its
    DeepSpeed JSON, which the driver writes beside stage.json."""
    from omegaconf import OmegaConf

    if not stage.cls.trains:
        return {"name": "local"}, None
    launcher = dict(launcher)
    if launcher["name"] != "local" and launcher.get("deepspeed", True):
        ds = launch.deepspeed_config(OmegaConf.to_container(cfg.deepspeed, resolve=True), stage.params)
        launcher["deepspeed_config"] = str(store_dir / launch.DEEPSPEED_FILE)
        return launcher, ds
    return launcher, None


def inspect_entry(st: PlannedStage, full: bool = False) -> tuple[Artifact | None, str | None]:
    """(the finished artifact at st.store_dir when it can be reused, why it cannot ("FILE: why")).
    An entry without artifact.json is simply not done: (None, None)."""
    if not Artifact.exists(st.store_dir):
        return None, None
    try:
        art = Artifact.load(st.store_dir)
    except ArtifactError as e:
        return None, str(e)
    if art.config_hash != st.config_hash or art.inputs_hash != st.inputs_hash:
        return None, f"{st.store_dir / 'artifact.json'}: records another config or inputs than this stage's"
    problems = check_files(art, st.store_dir, full=full)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return None, problems[0] + more
    return art, None


def upstream_identity(art: Artifact | None) -> str | None:
    """What a stage's inputs hash says about the stage it reads from: the digest of the files that
    stage handed on, so other weights under the same upstream key (a forced, non-reproducing
    rerun) give other keys downstream, and reproduced weights the same ones."""
    return f"content:{art.content_digest}" if art is not None and art.content_digest else None


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


def model_label(model: Any) -> str:
    """How `show` names a recipe model without a path: its source builds or converts it into the cache."""
    source = model.get("source") or "tiny"
    if source == "tiny":
        return "tiny model (built locally, cached)"
    if source == "hub":
        return f"{model.get('name')} (from the hub)"
    return f"{model.get('name')} (from source '{source}', converted once into the cache)"
