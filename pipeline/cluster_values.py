"""Range checks of every value that reaches a launcher command or an sbatch script, in `validate`,
`run` and `submit` before anything is written or submitted: one line naming the key. (Slurm would
take `--nodes=0` for 1 after a silent `or 1`, and `--time=garbage` into the script; a world size of
-2 would divide the global batch.)"""
from __future__ import annotations

import re
from typing import Any

from .errors import ConfigError

# Slurm's --time: "minutes", "minutes:seconds", "hours:minutes:seconds", "days-hours",
# "days-hours:minutes", "days-hours:minutes:seconds" (sbatch(1)), or unlimited
_TIME = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2})$")
_UNLIMITED = ("UNLIMITED", "INFINITE")
# --mem: a positive integer, default unit megabytes, or with a suffix K, M, G or T
_MEM = re.compile(r"^[1-9]\d*[KMGT]?$", re.IGNORECASE)
# names put on an #SBATCH line: no space or newline (a newline would start a new script line)
_NAME = re.compile(r"^[^\s]+$")


def _fail(key: str, value: Any, want: str) -> None:
    raise ConfigError(f"{key}: {want}, got {value!r}")


def _count(key: str, value: Any, least: int, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        _fail(key, value, f"an integer >= {least}" + (" (or null)" if optional else ""))


def check_time(key: str, value: Any) -> None:
    if value is None:
        return
    s = str(value).strip()
    if s.upper() in _UNLIMITED or isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return
    if not isinstance(value, str) or not _TIME.match(s) or not any(c != "0" for c in s if c.isdigit()):
        _fail(key, value, "a Slurm time limit (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS)")
    parts = re.split(r"[-:]", s)
    # the minutes and seconds fields are below 60 where there is a larger field before them
    if ":" in s and any(int(p) >= 60 for p in parts[-(s.count(":")):]):
        _fail(key, value, "a Slurm time limit with minutes and seconds below 60")


def check_mem(key: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not _MEM.match(str(value).strip()):
        _fail(key, value, "a memory size: a positive integer (megabytes) or with a unit K, M, G or T (e.g. 200G)")


def check_sbatch(sb: dict, prefix: str = "slurm.") -> None:
    """The `launcher.sbatch` block (`slurm.KEY=VALUE` on `medpipe submit`)."""
    k = lambda name: prefix + name  # noqa: E731
    _count(k("nodes"), sb.get("nodes"), 1, optional=False)
    _count(k("gpus_per_node"), sb.get("gpus_per_node"), 0)
    _count(k("cpus_per_task"), sb.get("cpus_per_task"), 1)
    _count(k("signal_margin"), sb.get("signal_margin"), 1)
    check_time(k("time"), sb.get("time"))
    check_mem(k("mem"), sb.get("mem"))
    for name in ("partition", "account", "qos", "job_name"):
        v = sb.get(name)
        if v is not None and (not isinstance(v, str) or not _NAME.match(v)):
            _fail(k(name), v, "one word (no spaces or line breaks)")
    if not isinstance(sb.get("requeue", True), bool):
        _fail(k("requeue"), sb.get("requeue"), "true or false")
    extra = sb.get("extra") or []
    if not isinstance(extra, list):
        _fail(k("extra"), extra, "a list of sbatch options")
    for i, flag in enumerate(extra):
        if not isinstance(flag, str) or not flag.startswith("-") or "\n" in flag:
            _fail(f"{k('extra')}[{i}]", flag, "an sbatch option starting with '-' on one line")


def check_launcher(launcher: dict) -> None:
    """Counts and ports of any launcher, and the sbatch block of launcher=slurm."""
    name = launcher.get("name", "local")
    if name == "local":
        return
    slurm = name == "slurm"   # null: taken from the allocation
    _count("launcher.num_gpus", launcher.get("num_gpus"), 1, optional=slurm)
    _count("launcher.num_nodes", launcher.get("num_nodes"), 1, optional=slurm)
    if "node_rank" in launcher:
        _count("launcher.node_rank", launcher.get("node_rank"), 0)
    port = launcher.get("master_port")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535):
        _fail("launcher.master_port", port, "a TCP port (1-65535)")
    if slurm:
        check_sbatch(launcher.get("sbatch") or {})
