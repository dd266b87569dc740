"""Launchers: how one stage's entry point is started.

`local` calls the entry point in this process. `deepspeed`, `torchrun` and `accelerate` start it
through the real launcher CLI as a subprocess (never a home-made one); the pipeline loop stays in
the driver. DeepSpeed's JSON config is written next to the stage file from conf/deepspeed/.
`slurm` (medpipe.slurm) runs the driver once inside an allocation and starts each training stage
across it with `srun`: one deepspeed/torchrun launcher per node.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from .errors import MedpipeError

DEEPSPEED_FILE = "deepspeed.json"  # written by the driver into the stage dir, beside stage.json

MODULE = "medpipe.entry"


class StageFailed(MedpipeError):
    pass


def _bin(name: str) -> str:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def planned_world_size(launcher: dict) -> int:
    """Ranks a training stage runs on under this launcher (local: one process)."""
    if launcher.get("name", "local") == "local":
        return 1
    if launcher["name"] == "slurm":
        from .slurm import layout

        nodes, gpus = layout(launcher)
        return nodes * gpus
    return int(launcher.get("num_gpus", 1)) * int(launcher.get("num_nodes", 1))


def command(launcher: dict, stage_file: Path) -> list[str] | None:
    """The exact command that starts the stage, or None for in-process."""
    name = launcher["name"]
    if name not in LAUNCHERS:
        raise MedpipeError(f"unknown launcher '{name}' (available: {', '.join(LAUNCHERS)})")
    return LAUNCHERS[name](launcher, stage_file)


def _net(launcher: dict) -> tuple[int, int, str, Any, list[str]]:
    """(GPUs per node, nodes, master port, master address, extra launcher arguments)."""
    return (int(launcher.get("num_gpus", 1)), int(launcher.get("num_nodes", 1)), str(launcher.get("master_port", 29500)),
            launcher.get("master_addr"), [str(a) for a in launcher.get("extra_args") or []])


def _local(launcher: dict, stage_file: Path) -> None:
    return None


def _deepspeed(launcher: dict, stage_file: Path) -> list[str]:
    gpus, nodes, port, addr, extra = _net(launcher)
    hostfile = launcher.get("hostfile")
    cmd = [_bin("deepspeed"), *deepspeed_devices(gpus, nodes, hostfile), "--master_port", port]
    if hostfile:
        cmd += ["--hostfile", str(hostfile)]
    if addr:
        cmd += ["--master_addr", str(addr)]
    return cmd + extra + ["--module", MODULE, str(stage_file)]


def _torchrun(launcher: dict, stage_file: Path) -> list[str]:
    gpus, nodes, port, addr, extra = _net(launcher)
    cmd = [_bin("torchrun"), "--nproc_per_node", str(gpus), "--nnodes", str(nodes)]
    if nodes > 1:
        if not addr:
            raise MedpipeError("launcher=torchrun with num_nodes > 1 needs launcher.master_addr (rendezvous host)")
        cmd += ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"{addr}:{port}"]
    else:
        cmd += ["--master_port", port]
    return cmd + extra + ["-m", MODULE, str(stage_file)]


def _accelerate(launcher: dict, stage_file: Path) -> list[str]:
    gpus, nodes, port, addr, extra = _net(launcher)
    cmd = [_bin("accelerate"), "launch", "--num_processes", str(gpus * nodes), "--num_machines", str(nodes),
           "--main_process_port", port]
    if launcher.get("deepspeed", True):
        cmd += ["--use_deepspeed", "--deepspeed_config_file",
                str(launcher.get("deepspeed_config") or stage_file.parent / DEEPSPEED_FILE)]
    elif gpus * nodes > 1:
        # without --multi_gpu, accelerate silently starts ONE process
        cmd += ["--multi_gpu"]
    if nodes > 1:
        if not addr:
            raise MedpipeError("launcher=accelerate with num_nodes > 1 needs launcher.master_addr")
        cmd += ["--main_process_ip", str(addr), "--machine_rank", str(launcher.get("node_rank", 0))]
    return cmd + extra + ["-m", MODULE, str(stage_file)]


def _slurm(launcher: dict, stage_file: Path) -> list[str]:
    from .slurm import srun_command

    return srun_command(launcher, stage_file, MODULE, _bin)


# launcher name (conf/launcher/<name>.yaml) -> the command that starts a stage under it
LAUNCHERS: dict[str, Callable[[dict, Path], list[str] | None]] = {
    "local": _local, "deepspeed": _deepspeed, "torchrun": _torchrun, "accelerate": _accelerate, "slurm": _slurm}


def visible_gpus() -> list[str] | None:
    """The GPU ids CUDA_VISIBLE_DEVICES restricts this process to; None when it is unset or empty."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    return [x.strip() for x in raw.split(",") if x.strip()] or None


def deepspeed_devices(gpus: int, nodes: int, hostfile: Any) -> list[str]:
    """Which GPUs `deepspeed` starts ranks on. The launcher deletes CUDA_VISIBLE_DEVICES whenever it
    gets --num_gpus and then uses GPUs 0..N-1, so on one node with CUDA_VISIBLE_DEVICES set the
    first N of those ids are named with --include localhost:<ids> (--include excludes --num_gpus
    and --num_nodes). Multi-node (hostfile) runs use each host's slots."""
    ids = visible_gpus()
    if ids is None or nodes > 1 or hostfile:
        return ["--num_gpus", str(gpus), "--num_nodes", str(nodes)]
    if not all(i.isdigit() for i in ids):
        raise MedpipeError(f"CUDA_VISIBLE_DEVICES={','.join(ids)}: deepspeed --include takes GPU indices; "
                           f"set CUDA_VISIBLE_DEVICES to indices (e.g. 2,3) or unset it")
    if gpus > len(ids):
        raise MedpipeError(f"launcher.num_gpus={gpus} but CUDA_VISIBLE_DEVICES={','.join(ids)} makes only "
                           f"{len(ids)} GPU(s) visible")
    return ["--include", "localhost:" + ",".join(ids[:gpus])]


def deepspeed_config(ds: dict, params: Any) -> dict:
    """The stage's DeepSpeed JSON: "auto" wherever HF's integration fills values from the stage's
    TrainingArguments (batch size, accumulation, clipping, optimizer and scheduler values), so the
    recipe stays the one source of truth. Precision too: bf16/fp16 stay "auto" and each rank's
    TrainingArguments (`precision: auto` resolved where the rank runs, on its GPU) fill them, so a
    driver on a GPU-less head node does not decide for the ranks; only an explicit fp32 is fixed here."""
    import copy

    cfg = copy.deepcopy(ds)
    fixed = getattr(params, "precision", "auto") == "fp32"
    cfg["bf16"] = {"enabled": False if fixed else "auto"}
    cfg["fp16"] = {"enabled": False if fixed else "auto"}
    return cfg


def run(launcher: dict, stage_file: Path, log_file: Path, planned: list[str] | None = None) -> None:
    """Start the stage: `planned` is its launch command from the run plan (medpipe.plan), else the
    launcher's command is worked out here; none means inside this process."""
    if os.environ.get("MEDPIPE_SLURM_DRIVER"):  # the sbatch script's driver: scancel/preemption/time limit
        from .slurm import install_driver_signals

        install_driver_signals()
    if launcher["name"] == "slurm":
        from .slurm import write_hostfile

        write_hostfile(launcher, stage_file.parent)
    from .console import StageDisplay

    cmd = planned if planned is not None else command(launcher, stage_file)
    if cmd is None:
        from .entry import run_stage_file

        try:
            with StageDisplay(log_file) as display, display.quiet():
                run_stage_file(stage_file)
        finally:
            release_memory()
        return
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    print(f"  $ {shlex.join(cmd)}", flush=True)
    with open(log_file, "ab") as log, StageDisplay(log_file) as display:
        log.write(f"$ {shlex.join(cmd)}\n".encode())
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                display.feed(line, log)
            code = proc.wait()
        except KeyboardInterrupt:  # Ctrl-C / scancel: the launcher ends its ranks (they keep their checkpoints)
            _stop(proc)
            raise
    if code != 0:
        raise StageFailed(f"launcher exited with code {code}\n{failing_rank_tail(stage_file.parent)}")


def release_memory() -> None:
    """After a stage that ran in the driver (eval, voc_label, any stage on launcher=local): collect
    what it left in reference cycles (models with hooks; a vLLM backend, whose finalizer shuts its
    engine down) and hand the cached CUDA blocks back, so the next stage's rank 0 gets all of GPU 0.
    torch is only consulted when a stage imported it (the driver itself never does)."""
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM if os.name == "posix" else signal.SIGINT)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def failing_rank_tail(stage_dir: Path, lines: int = 25) -> str:
    """Tail of the first rank log that holds a traceback (else the launcher log)."""
    logs = sorted((stage_dir / "logs").glob("rank*.log")) if (stage_dir / "logs").is_dir() else []
    for log in logs:
        text = log.read_text(errors="replace")
        if "Traceback" in text or " ERROR " in text:
            return f"--- {log} (last {lines} lines) ---\n" + "\n".join(text.splitlines()[-lines:])
    launcher_log = stage_dir / "launcher.log"
    if launcher_log.exists():
        return f"--- {launcher_log} ---\n" + "\n".join(launcher_log.read_text(errors="replace").splitlines()[-lines:])
    return ""
