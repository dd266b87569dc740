"""What `medpipe show` prints after the config: each stage's input and output, whether a finished
result will be reused (and from where), and the exact launch command under a distributed launcher."""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from medpipe import launch
from medpipe.compose import StagePlan
from medpipe.entry import STAGE_FILE
from medpipe.params import GlobalBatch
from medpipe.run import base_identity, is_done, plan_keys, read_status, stage_dir_name


def describe(cfg: Any, plans: list[StagePlan], recipe: str | None = None, overrides: list[str] | None = None) -> list[str]:
    from omegaconf import OmegaConf

    lines = ["# stages (in order):"]
    keyed = plan_keys(cfg, plans, base_identity(cfg))
    launcher = OmegaConf.to_container(cfg.launcher, resolve=True)
    model = cfg.model.path or "tiny model (built locally, cached)"
    for k in keyed:
        p = k.plan
        source = f"stage '{p.source}'" if p.source else f"model {model}"
        if is_done(k):
            state = f"reuse finished result {k.store_dir}"
        else:
            st = read_status(k.store_dir).get("state")
            state = "resume from last checkpoint in " + str(k.store_dir) if st in ("interrupted", "failed") \
                else f"train → {k.store_dir}"
        lines.append(f"#  {stage_dir_name(p)} [{p.kind}] input: {source}; {state}")
        if isinstance(p.params, GlobalBatch) and p.cls.trains:
            try:
                lines.append(f"#     batch: {p.params.describe_batch(launch.planned_world_size(launcher))}")
            except ValueError as e:  # `run` refuses this before anything trains; show says why
                lines.append(f"#     batch: global batch {p.params.batch_size} CANNOT run on this launcher: {e}")
        if launcher["name"] != "local" and p.cls.trains:
            cmd = launch.command(launcher, Path(k.store_dir) / STAGE_FILE)
            lines.append(f"#     launch: {shlex.join(cmd)}")
    lines += memory_lines(cfg, plans)
    if launcher["name"] == "slurm":
        lines += sbatch_lines(cfg, recipe, overrides or [])
    return lines


def memory_lines(cfg: Any, plans: list[StagePlan], model_dir: str | None = None) -> list[str]:
    """The per-GPU memory plan of every training stage (medpipe.memplan), and why a stage cannot run
    under the chosen ZeRO stage; `validate` and `run` refuse what these lines flag."""
    from omegaconf import OmegaConf

    from medpipe import memplan
    from medpipe.cluster_values import check_launcher

    check_launcher(OmegaConf.to_container(cfg.launcher, resolve=True))  # a plan over 0 or -2 ranks means nothing
    memories, where = memplan.plan_recipe(cfg, plans, model_dir)
    out = memplan.lines(cfg, memories, where)
    for problem in (memplan.zero3_refusal(cfg, plans), memplan.refusal(cfg, plans, model_dir)):
        if problem:
            out.append(f"#  REFUSED by validate/run: {problem}")
    return out


def sbatch_lines(cfg: Any, recipe: str | None, overrides: list[str]) -> list[str]:
    """The batch script: the one `medpipe submit` wrote into run.dir, else the one it would write."""
    from medpipe import slurm
    from medpipe.run import runs_root

    run_dir = Path(cfg.run.dir).expanduser() if cfg.run.get("dir") else None
    written = run_dir / slurm.SBATCH_FILE if run_dir is not None else None
    if written is not None and written.is_file():
        head, text = f"# sbatch script ({written}):", written.read_text()
    elif recipe is not None:
        from .submit import script_for

        target = (run_dir or runs_root(cfg) / f"{cfg.name}-<time>").resolve()
        head, text = "# sbatch script (`medpipe submit` writes it to RUN_DIR/slurm.sbatch):", \
            script_for(cfg, recipe, overrides, target)
    else:
        return []
    return [head] + [f"#   {line}" for line in text.rstrip().splitlines()]
