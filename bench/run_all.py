"""Run every benchmark in bench/ one after another (`make bench`) and collect their outputs.

    .venv/bin/python bench/run_all.py [--only medcare,eval_mcq] [--out bench/results]

Each script runs in its own process with the arguments BENCHMARKS.md quotes, one at a time (they
compare variants within one run, so they must not share the CPU with each other). Full outputs
go to OUT/<name>.txt; the lines each script marks as its result (RESULT lines, ratio lines,
markdown tables) are printed again at the end. A failing script is reported and the rest still
run; the exit status is 1 if any failed.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> extra arguments (BENCHMARKS.md has the figures these produce)
BENCHES: dict[str, list[str]] = {
    "cli": [],
    "data_validate": [],
    "data_pack": [],
    "option_scoring": [],
    "eval_mcq": ["--reps", "5"],
    "eval_generate": [],
    "cpoly_layer": ["--reps", "30"],
    "medcare_layer": ["--reps", "9"],
    "stage_overhead": ["--reps", "3"],
    "eval_protocols": ["--reps", "5"],
}


def is_result(line: str) -> bool:
    return (line.lstrip().startswith(("RESULT", "ratio", "|", "peak", "OK", "validate", "DPO peak"))
            or any(k in line for k in ("x the throughput", "speed-up", "ratio vs")))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated names: " + ",".join(BENCHES))
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args()
    names = [n.strip() for n in a.only.split(",") if n.strip()] or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHES)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    summary, failed = [], []
    for name in names:
        cmd = [sys.executable, str(HERE / f"bench_{name}.py"), *BENCHES[name]]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        text = proc.stdout + (f"\n[stderr]\n{proc.stderr}" if proc.returncode else "")
        (out / f"{name}.txt").write_text(text, encoding="utf-8")
        took = time.perf_counter() - t0
        if proc.returncode:
            failed.append(name)
            print(f"   FAILED (exit {proc.returncode}) after {took:.0f} s; see {out / (name + '.txt')}", flush=True)
            continue
        lines = [ln for ln in proc.stdout.splitlines() if is_result(ln)]
        summary.append((name, lines))
        print(f"   done in {took:.0f} s", flush=True)
    print("\n# results")
    for name, lines in summary:
        print(f"\n## {name}")
        print("\n".join(lines) or "(no result lines; full output in the results folder)")
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
