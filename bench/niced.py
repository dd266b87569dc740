"""Child processes at raised priority on a shared Linux machine, with their CPU time.

`nice` alone ranks a process only against the processes of its own session: with the kernel's
autogroup scheduling (sched_autogroup_enabled = 1), CPU is shared between sessions first. A child
started here gets its own session and that session's autogroup gets the same nice value (root
only; otherwise it runs at the default priority, with a warning). `wait` returns the child's CPU
seconds (user + sys, its waited-for descendants included) from os.wait4, and its wall seconds."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def start(cmd: list[str], nice: int = -10, **popen) -> subprocess.Popen:
    proc = subprocess.Popen(["nice", "-n", str(nice), *cmd], start_new_session=True, **popen)
    proc.started = time.time()
    try:
        Path(f"/proc/{proc.pid}/autogroup").write_text(str(nice))
    except OSError as e:
        print(f"autogroup nice {nice} not set ({e}): the child competes at the default priority", flush=True)
    return proc


def wait(proc: subprocess.Popen) -> dict:
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "wall_s": time.time() - proc.started, "cpu_s": usage.ru_utime + usage.ru_stime,
            "user_s": usage.ru_utime, "sys_s": usage.ru_stime}
