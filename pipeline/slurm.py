"""Slurm: the pipeline as one batch job.

`medpipe submit` writes `<run_dir>/slurm.sbatch` and submits it; the script `exec`s the driver
(`medpipe run ... launcher=slurm`), so the driver IS the batch shell and receives the time-limit
warning (`--signal=B:USR1@margin`) and scancel's SIGTERM itself. The driver runs once; each
training stage starts across the allocation as one `srun` step with one launcher task per node
(deepspeed or torchrun inside, which spawn the ranks). Finished stages live in the store, so a
requeued or resubmitted job skips them and the interrupted stage resumes from its checkpoint.

Why not submitit: it either runs the payload inside an srun step that holds the CPUs (every stage
srun would block or need --overlap, and on many nodes the driver would run once per task), or it
runs it in the batch shell without `B:` on the signal, so the preemption warning never reaches the
driver; it also pickles the callable and reads job state through sacct (absent on many clusters).
Measured in /work/notes/slurm/submitit.md.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError, MedpipeError

SBATCH_FILE = "slurm.sbatch"   # in the run dir; `medpipe show` prints it
JOBS_FILE = "slurm.json"       # job ids submitted for this run dir, newest last
HOSTFILE = "hostfile"          # deepspeed's, written into the stage dir on multi-node allocations
SBATCH_KEYS = ("partition", "nodes", "gpus_per_node", "cpus_per_task", "cpus_per_gpu", "mem", "time", "account",
               "qos", "job_name", "signal_margin", "requeue", "extra")


def _slurm(args: list[str]) -> subprocess.CompletedProcess:
    """A Slurm client command; a machine without Slurm is one clear error, not a traceback."""
    try:
        return subprocess.run(args, capture_output=True, text=True)
    except FileNotFoundError:
        raise MedpipeError(f"{args[0]}: not found (a Slurm client must be on PATH: run this on a login or "
                           f"compute node of the cluster)") from None


def _env_int(name: str) -> int | None:
    """An integer Slurm variable; GPU counts may read `gpu:8` or `8(x2)`."""
    raw = os.environ.get(name)
    if not raw:
        return None
    head = raw.split(",")[0].split("(")[0].split(":")[-1]
    return int(head) if head.isdigit() else None


def layout(launcher: dict) -> tuple[int, int]:
    """(nodes, ranks per node) of a training stage: the launcher's explicit values, else the
    allocation's (SLURM_NNODES, SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE), else what submit asks for."""
    sb = launcher.get("sbatch") or {}
    nodes = launcher.get("num_nodes") or _env_int("SLURM_NNODES") or sb.get("nodes") or 1
    gpus = launcher.get("num_gpus") or _env_int("SLURM_GPUS_ON_NODE") or _env_int("SLURM_GPUS_PER_NODE") \
        or sb.get("gpus_per_node") or 1
    return int(nodes), int(gpus)


def hosts() -> list[str]:
    """The allocation's hosts, first = master (`scontrol show hostnames $SLURM_JOB_NODELIST`)."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return []
    out = _slurm(["scontrol", "show", "hostnames", nodelist])
    if out.returncode != 0:
        raise MedpipeError(f"scontrol show hostnames {nodelist}: {out.stderr.strip() or out.returncode}")
    return out.stdout.split()


def write_hostfile(launcher: dict, stage_dir: Path) -> None:
    nodes, gpus = layout(launcher)
    if nodes > 1 and launcher.get("backend", "deepspeed") == "deepspeed":
        names = hosts()[:nodes]
        (stage_dir / HOSTFILE).write_text("".join(f"{h} slots={gpus}\n" for h in names))


def srun_command(launcher: dict, stage_file: Path, module: str, find: Callable[[str], str]) -> list[str]:
    """`srun` with one task per node, the stage's launcher inside. Node rank comes from each task's
    own $SLURM_NODEID (expanded by the task's shell, not here); SLURM_PROCID is NOT the rank
    inside deepspeed/torchrun (every rank of a task inherits the task's)."""
    nodes, gpus = layout(launcher)
    port = str(launcher.get("master_port", 29500))
    backend = launcher.get("backend", "deepspeed")
    extra = [str(a) for a in launcher.get("extra_args") or []]
    srun = [find("srun"), f"--nodes={nodes}", f"--ntasks={nodes}",
            "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if launcher.get("overlap", True):  # the driver may itself run in a step that holds the CPUs (srun medpipe run)
        srun.append("--overlap")
    srun += [str(a) for a in launcher.get("srun_args") or []]
    master = (hosts() or ["$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1)"])[0]  # outside: for show
    if backend == "deepspeed":
        inner = [find("deepspeed")]
        if nodes > 1:
            inner += ["--hostfile", str(stage_file.parent / HOSTFILE), "--no_ssh", "--node_rank=$SLURM_NODEID",
                      "--master_addr", master]
        else:
            inner.append(_ONE_NODE_DEVICES.format(n=gpus))
        inner += ["--master_port", port, *extra, "--module", module, str(stage_file)]
    elif backend == "torchrun":
        inner = [find("torchrun"), "--nnodes", str(nodes), "--nproc_per_node", str(gpus)]
        if nodes > 1:
            inner += ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"{master}:{port}",
                      "--rdzv_id", "$SLURM_JOB_ID"]
        else:
            inner += ["--master_port", port]
        inner += [*extra, "-m", module, str(stage_file)]
    else:
        raise ConfigError(f"launcher.backend: '{backend}' (launcher=slurm runs deepspeed or torchrun on each node)")
    if nodes == 1 and backend != "deepspeed":
        return srun + inner  # torchrun keeps the task's CUDA_VISIBLE_DEVICES
    # $SLURM_NODEID / $SLURM_JOB_ID / the device choice are each task's own: quote everything else,
    # expand those in the task's shell
    script = " ".join(a if "$SLURM_" in a or a.startswith("$(") else shlex.quote(a) for a in inner)
    return srun + ["bash", "-c", "exec " + script]


# `deepspeed --num_gpus N` deletes CUDA_VISIBLE_DEVICES and takes GPUs 0..N-1, which are not the
# task's GPUs where Slurm does not constrain devices (the task sees all and CUDA_VISIBLE_DEVICES=4,5,...):
# the task's shell names its first N visible ids with --include instead (as medpipe.launch does locally).
# Multi-node stages use each host's hostfile slots (whole-node or device-constrained allocations).
# Only indices count: some Slurm versions set CUDA_VISIBLE_DEVICES=NoDevFiles on GPU-less steps.
_ONE_NODE_DEVICES = ('$([[ "$CUDA_VISIBLE_DEVICES" =~ ^[0-9]+(,[0-9]+)*$ ]] && echo --include '
                     'localhost:$(echo "$CUDA_VISIBLE_DEVICES" | cut -d, -f1-{n}) || echo --num_gpus {n})')


def sbatch_resources(sb: dict) -> dict:
    """cpus-per-task and mem as submitted: the given values, else, when GPUs are asked for, every
    rank its share of cores (cpus_per_gpu × gpus_per_node on the one task per node that spawns the
    ranks; unset, Slurm gives that task ONE CPU and 8 ranks share it) and the node's whole memory
    (--mem=0: each rank loads the model into host memory before DeepSpeed places it)."""
    gpus = int(sb.get("gpus_per_node") or 0)
    cpus, mem = sb.get("cpus_per_task"), sb.get("mem")
    if gpus > 0:
        cpus = cpus or int(sb.get("cpus_per_gpu") or 8) * gpus
        mem = mem if mem not in (None, "") else "0"
    return {"cpus_per_task": cpus, "mem": None if mem is None else str(mem)}


# ---- the driver inside the job --------------------------------------------------------------------
_installed = False


def install_driver_signals() -> None:
    """SIGTERM (scancel, preemption, requeue) becomes KeyboardInterrupt: the running stage is marked
    interrupted and keeps its checkpoints. SIGUSR1 (the time-limit warning, `--signal=B:USR1@...`)
    requeues the job, whose restart resumes through the store."""
    global _installed
    if _installed:
        return
    _installed = True

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    def on_usr1(signum, frame):
        job = os.environ.get("SLURM_JOB_ID")
        print(f"medpipe: time limit near: requeueing job {job} (finished stages are kept, the running one "
              f"resumes from its checkpoint)", flush=True)
        if job:
            subprocess.run(["scontrol", "requeue", job], check=False)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGUSR1, on_usr1)


# ---- submit ---------------------------------------------------------------------------------------
def sbatch_script(sb: dict, run_dir: Path, driver: list[str], workdir: Path, plan: list[str] = ()) -> str:
    """The batch script: resources, requeue, output appended across restarts, the warning signal to
    the batch shell, and `exec` of the driver (so the driver gets that signal). `plan`: the run
    plan's lines (`# ...`), kept in the script as comments."""
    lines = ["#!/bin/bash", f"# written by medpipe submit; resubmit with: sbatch {run_dir / SBATCH_FILE}"]
    if plan:
        lines += ["# the run plan when written (the driver plans again when the job starts: what is",
                  "# finished by then is reused):", *plan]

    def opt(flag: str, value: Any) -> None:
        if value not in (None, "", 0):
            lines.append(f"#SBATCH --{flag}={value}")

    opt("job-name", sb.get("job_name") or f"medpipe-{run_dir.name}")
    opt("partition", sb.get("partition"))
    opt("account", sb.get("account"))
    opt("qos", sb.get("qos"))
    opt("nodes", int(sb.get("nodes") or 1))
    lines.append("#SBATCH --ntasks-per-node=1")
    opt("gpus-per-node", sb.get("gpus_per_node"))
    res = sbatch_resources(sb)
    opt("cpus-per-task", res["cpus_per_task"])
    opt("mem", res["mem"])
    opt("time", sb.get("time"))
    lines.append("#SBATCH --requeue" if sb.get("requeue", True) else "#SBATCH --no-requeue")
    lines.append("#SBATCH --open-mode=append")
    lines.append(f"#SBATCH --output={run_dir}/slurm-%j.out")
    opt("signal", f"B:USR1@{int(sb.get('signal_margin') or 300)}")
    for flag in sb.get("extra") or []:
        lines.append(f"#SBATCH {flag}")
    lines += [
        "",
        'echo "medpipe: job $SLURM_JOB_ID start $(date -Is) on $(hostname) restart=${SLURM_RESTART_COUNT:-0}"',
        f"cd {shlex.quote(str(workdir))}",
        "export MEDPIPE_SLURM_DRIVER=1 PYTHONUNBUFFERED=1",
        "exec " + shlex.join(driver),
        "",
    ]
    return "\n".join(lines)


def submit(script: Path) -> str:
    out = _slurm(["sbatch", "--parsable", str(script)])
    if out.returncode != 0:
        raise MedpipeError(f"sbatch {script}: {(out.stderr or out.stdout).strip() or 'exit ' + str(out.returncode)}")
    job = out.stdout.strip().split(";")[0]
    jobs_file = script.parent / JOBS_FILE
    known = read_jobs(script.parent)
    from .store import now

    known.append({"job_id": job, "submitted": now(), "script": str(script)})
    jobs_file.write_text(json.dumps({"jobs": known}, indent=1))
    return job


def read_jobs(run_dir: Path) -> list[dict]:
    try:
        return list(json.loads((Path(run_dir) / JOBS_FILE).read_text()).get("jobs", []))
    except (OSError, ValueError):
        return []


def job_state(job: str) -> dict:
    """State of a job from scontrol (sacct may be disabled). A finished job's record is purged
    MinJobAge (~5 min) after it ends: then `state` is `GONE`."""
    try:
        out = _slurm(["scontrol", "show", "job", "-o", job])
    except MedpipeError as e:
        return {"job_id": job, "state": "UNKNOWN", "reason": str(e)}
    if out.returncode != 0:
        if "Invalid job id" in out.stderr:
            return {"job_id": job, "state": "GONE", "reason": "no longer known to Slurm (ended > MinJobAge ago)"}
        return {"job_id": job, "state": "UNKNOWN", "reason": out.stderr.strip()}
    fields = dict(tok.split("=", 1) for tok in out.stdout.split() if "=" in tok)
    return {"job_id": job, "state": fields.get("JobState", "?"), "reason": fields.get("Reason", ""),
            "restarts": fields.get("Restarts", "0"), "nodes": fields.get("NodeList", ""),
            "elapsed": fields.get("RunTime", ""), "limit": fields.get("TimeLimit", ""),
            "exit": fields.get("ExitCode", "")}


def python() -> str:
    return sys.executable
