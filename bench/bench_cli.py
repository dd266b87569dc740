"""Start-up cost of the CLI: `medpipe --help` and `medpipe show recipe=qilin` (median of N runs,
whole processes), against `python -c pass` in the same run as the floor."""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
N = 7


def median_wall(cmd: list[str]) -> float:
    walls = []
    for i in range(N + 1):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, capture_output=True, check=True)
        if i:  # first run warms the page cache
            walls.append(time.perf_counter() - t0)
    return statistics.median(walls)


def main() -> None:
    medpipe = str(Path(sys.executable).parent / "medpipe")
    floor = median_wall([sys.executable, "-c", "pass"])
    helps = median_wall([medpipe, "--help"])
    show = median_wall([medpipe, "show", "recipe=qilin"])
    print("| command | median wall s | goal |\n|---|---|---|")
    print(f"| python -c pass (floor) | {floor:.3f} | |")
    print(f"| medpipe --help | {helps:.3f} | ≤ 0.3 |")
    print(f"| medpipe show recipe=qilin | {show:.3f} | ≤ 1.5 |")


if __name__ == "__main__":
    main()
