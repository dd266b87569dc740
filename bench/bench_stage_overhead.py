"""What the engine adds: a whole `medpipe run` of one SFT (or DPO) stage against the same TRL run
written by hand (bench/handwritten.py), as separate processes, alternated A B A B, same model and
data. Also peak RSS of DPO with LoRA (reference = adapter disabled, one model) vs full fine-tuning
(a frozen reference copy). Prints a markdown table; usage: python bench/bench_stage_overhead.py [--reps 3]"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MEDPIPE = [PY, "-m", "medpipe.cli"]


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB of the largest process in the tree) — via wait4 on the child."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def pair(kind: str, model: str, reps: int) -> list[tuple[float, float]]:
    out = []
    for _ in range(reps):
        with tempfile.TemporaryDirectory() as tmp:
            a, _ = timed(MEDPIPE + ["run", f"recipe=bench/recipes/{kind}_only.yaml", f"run.root={tmp}/runs"])
            b, _ = timed([PY, "bench/handwritten.py", kind, model, f"{tmp}/hand"])
        out.append((a, b))
        print(f"  {kind}: medpipe {a:.1f}s  by hand {b:.1f}s  ratio {a / b:.3f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-rss", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from medpipe.stages.tiny import ensure_tiny

    model = str(ensure_tiny())
    rows = []
    for kind in ("sft", "dpo"):
        pairs = pair(kind, model, args.reps)
        ratios = [a / b for a, b in pairs]
        rows.append(f"| {kind} | {statistics.median(a for a, _ in pairs):.1f} | {statistics.median(b for _, b in pairs):.1f} "
                    f"| {statistics.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f}) |")
    print("\n| stage | medpipe run, s (median) | TRL by hand, s | ratio medpipe/hand (min–max) |\n|---|---|---|---|")
    print("\n".join(rows))
    if args.skip_rss:
        return
    # Peak memory, DPO: a bigger random model so the second model copy shows above the runtime's own.
    big = str(ensure_tiny({"hidden_size": 512, "num_layers": 8, "intermediate_size": 1408, "num_heads": 8,
                           "num_kv_heads": 4}))
    with tempfile.TemporaryDirectory() as tmp:
        _, lora = timed([PY, "bench/handwritten.py", "dpo", big, f"{tmp}/lora"])
        _, full = timed([PY, "bench/handwritten.py", "dpo", big, f"{tmp}/full", "--full"])
    print(f"\nDPO peak RSS on a 25M-parameter model: LoRA (reference = adapter disabled) {lora:.0f} MiB, "
          f"full fine-tuning (frozen reference copy) {full:.0f} MiB")


if __name__ == "__main__":
    main()
