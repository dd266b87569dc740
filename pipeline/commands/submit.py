"""`medpipe submit`: the whole pipeline as one Slurm batch job (medpipe.slurm). The script goes
into the run dir before it is submitted, with the run file, so `medpipe status RUN_DIR` and
`medpipe show` work at once, and a resubmission (same run.dir) resumes through the store."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medpipe import slurm
from medpipe.errors import ConfigError, MedpipeError

if TYPE_CHECKING:
    from medpipe.plan import RunPlan

ACTIVE = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED")


def slurm_overrides(overrides: list[str]) -> list[str]:
    """`slurm.KEY=VALUE` -> `launcher.sbatch.KEY=VALUE`, with `launcher=slurm` first (unknown keys
    named with what is allowed; another launcher is refused)."""
    out = ["launcher=slurm"]
    for o in overrides:
        if o.startswith("launcher=") and o != "launcher=slurm":
            raise ConfigError(f"{o}: medpipe submit runs the pipeline under launcher=slurm")
        if o.startswith("slurm."):
            key = o.split("=", 1)[0][len("slurm."):]
            if key not in slurm.SBATCH_KEYS:
                near = difflib.get_close_matches(key, slurm.SBATCH_KEYS, n=1)
                hint = f" (did you mean 'slurm.{near[0]}'?)" if near else ""
                raise ConfigError(f"slurm.{key}: unknown key{hint}. Allowed: {', '.join(slurm.SBATCH_KEYS)}")
            o = "launcher.sbatch." + o[len("slurm."):]
        if o != "launcher=slurm":
            out.append(o)
    return out


def wants_slurm(overrides: list[str]) -> bool:
    return any(o.startswith("slurm.") for o in overrides) or "launcher=slurm" in overrides


def driver_command(recipe: str, overrides: list[str], run_dir: Path) -> list[str]:
    from medpipe.compose import locate_recipe

    folder, name = locate_recipe(recipe)
    path = folder / f"{name}.yaml"
    recipe_arg = str(path) if Path(recipe).expanduser().is_file() or "/" in recipe or recipe.endswith(
        (".yaml", ".yml")) else recipe
    kept = [o for o in overrides if not o.startswith("run.dir=")]
    return [slurm.python(), "-m", "medpipe.commands.cli", "run", f"recipe={recipe_arg}", *kept, f"run.dir={run_dir}"]


def script_for(cfg: Any, recipe: str, overrides: list[str], run_dir: Path, plan: RunPlan | None = None) -> str:
    """The batch script, with the run plan's stage lines as comments when a plan is given."""
    from omegaconf import OmegaConf

    sb = OmegaConf.to_container(cfg.launcher, resolve=True).get("sbatch") or {}
    lines = plan.stage_lines()[1:] if plan is not None else []
    return slurm.sbatch_script(sb, run_dir, driver_command(recipe, overrides, run_dir), Path.cwd(), lines)


def submit_run(recipe: str, overrides: list[str], console: Any, dry_run: bool = False) -> tuple[Path, str | None]:
    """Check the recipe as `run` would (config, model, data, batch layout: nothing submitted when
    it is wrong), write run file + script into the run dir, sbatch it. Returns (run dir, job id)."""
    from medpipe.compose import bind_stages, compose
    from medpipe.run import Pipeline, prepare_run_dir, write_run_file

    overrides = slurm_overrides(overrides)
    cfg, _ = compose(recipe, overrides)
    plan = Pipeline(cfg, bind_stages(cfg), recipe, console, overrides).plan()
    run_dir = prepare_run_dir(cfg, recipe).resolve()
    for job in slurm.read_jobs(run_dir):
        state = slurm.job_state(job["job_id"])["state"]
        if state in ACTIVE:
            raise MedpipeError(f"job {job['job_id']} is {state} for {run_dir}; scancel it first or wait")
    write_run_file(run_dir, plan, recipe)
    script = run_dir / slurm.SBATCH_FILE
    script.write_text(script_for(cfg, recipe, overrides, run_dir, plan))
    script.chmod(0o755)
    if dry_run:
        return run_dir, None
    return run_dir, slurm.submit(script)


def job_lines(run_dir: Path) -> list[str]:
    """One line per job submitted for this run dir: `slurm job ID: STATE ...` (newest last)."""
    lines = []
    for job in slurm.read_jobs(run_dir):
        st = slurm.job_state(job["job_id"])
        more = [f"reason {st['reason']}" if st.get("reason") not in (None, "", "None") else "",
                f"restarts {st['restarts']}" if st.get("restarts") not in (None, "0") else "",
                f"on {st['nodes']}" if st.get("nodes") and st["nodes"] != "(null)" else "",
                f"elapsed {st['elapsed']}" if st.get("elapsed") else "",
                f"exit {st['exit']}" if st.get("exit") not in (None, "", "0:0") else ""]
        lines.append(f"slurm job {job['job_id']}: {st['state']}" +
                     "".join(f", {m}" for m in more if m) + f"  (log {run_dir}/slurm-{job['job_id']}.out)")
    return lines


def main_print(run_dir: Path, job: str | None) -> None:
    print(f"sbatch script: {run_dir / slurm.SBATCH_FILE}")
    if job is None:
        print("not submitted (--dry-run); submit with: sbatch " + str(run_dir / slurm.SBATCH_FILE))
        return
    print(f"submitted slurm job {job}")
    print(f"follow it with: medpipe status {run_dir}")
