"""What `medpipe show` prints after the config: each stage's input and output, whether a finished
result will be reused (and from where), and the exact launch command under a distributed launcher."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from medpipe.compose import StagePlan
from medpipe.plan import RunPlan, build_plan


def describe(cfg: Any, plans: list[StagePlan], recipe: str | None = None, overrides: list[str] | None = None) -> list[str]:
    """The run plan (medpipe.plan) as `show` prints it under the config."""
    plan = build_plan(cfg, plans, build_base=False, identify=True)
    return plan.stage_lines() + plan.memory_lines() + (sbatch_lines(plan, recipe, overrides or [])
                                                     if plan.launcher["name"] == "slurm" else [])


def sbatch_lines(plan: RunPlan, recipe: str | None, overrides: list[str]) -> list[str]:
    """The batch script: the one `medpipe submit` wrote into run.dir, else the one it would write."""
    from medpipe import slurm
    from medpipe.plan import runs_root

    cfg = plan.cfg
    run_dir = Path(cfg.run.dir).expanduser() if cfg.run.get("dir") else None
    written = run_dir / slurm.SBATCH_FILE if run_dir is not None else None
    if written is not None and written.is_file():
        head, text = f"# sbatch script ({written}):", written.read_text()
    elif recipe is not None:
        from .submit import script_for

        target = (run_dir or runs_root(cfg) / f"{cfg.name}-<time>").resolve()
        head, text = ("# sbatch script (`medpipe submit` writes it to RUN_DIR/slurm.sbatch, the stage lines above "
                      "as comments):"), \
            script_for(cfg, recipe, overrides, target)
    else:
        return []
    return [head] + [f"#   {line}" for line in text.rstrip().splitlines()]
