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
MEDPIPE = [PY, "-m", "medpipe.commands.cli"]


def timed(cmd: list[str]) -> tuple[float, float, float]:
    """(wall s, CPU s (user+sys), peak RSS MiB of the child) — via wait4. CPU seconds are what to
    compare on a shared machine: wall time there mostly measures the other jobs."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def pair(kind: str, model: str, reps: int) -> list[tuple[tuple, tuple]]:
    out = []
    for _ in range(reps):
        with tempfile.TemporaryDirectory() as tmp:
            a = timed(MEDPIPE + ["run", f"recipe=bench/recipes/{kind}_only.yaml", f"run.root={tmp}/runs"])
            b = timed([PY, "bench/handwritten.py", kind, model, f"{tmp}/hand"])
        out.append((a, b))
        print(f"  {kind}: medpipe wall {a[0]:.1f}s cpu {a[1]:.1f}s | by hand wall {b[0]:.1f}s cpu {b[1]:.1f}s"
              f" | cpu ratio {a[1] / b[1]:.3f}", flush=True)
    return out


RSS_MODELS = {  # random Qwen2 models built by medpipe.stages.models.tiny, and the DPO run's size flags
    "25m": ({"hidden_size": 512, "num_layers": 8, "intermediate_size": 1408, "num_heads": 8, "num_kv_heads": 4}, []),
    "100m": ({"hidden_size": 1024, "num_layers": 8, "intermediate_size": 2816, "num_heads": 16, "num_kv_heads": 4},
             ["--steps", "4", "--batch", "2", "--length", "64"]),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--skip-timing", action="store_true", help="only the DPO peak-memory comparison")
    ap.add_argument("--rss-size", choices=sorted(RSS_MODELS), default="25m",
                    help="random model for the DPO peak-memory comparison: 25m (30 steps, batch 8, length 256) "
                         "or 100m (weights and Adam state dominate: 4 steps, batch 2, length 64)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from medpipe.stages.models.tiny import ensure_tiny

    model = str(ensure_tiny())
    rows = []
    for kind in () if args.skip_timing else ("sft", "dpo"):
        pairs = pair(kind, model, args.reps)
        cpu = [a[1] / b[1] for a, b in pairs]
        wall = [a[0] / b[0] for a, b in pairs]
        rows.append(f"| {kind} | {statistics.median(a[1] for a, _ in pairs):.1f} | {statistics.median(b[1] for _, b in pairs):.1f} "
                    f"| {statistics.median(cpu):.3f} ({min(cpu):.3f}–{max(cpu):.3f}) | {statistics.median(wall):.3f} |")
    if rows:
        print("\n| stage | medpipe run, CPU s (median) | TRL by hand, CPU s | CPU ratio medpipe/hand (min–max) "
              "| wall ratio (median) |\n|---|---|---|---|---|")
        print("\n".join(rows))
    if args.skip_rss:
        return
    # Peak memory, DPO: a bigger random model so the second model copy shows above the runtime's own.
    spec, run_args = RSS_MODELS[args.rss_size]
    big = ensure_tiny(spec)
    from transformers import AutoConfig, AutoModelForCausalLM

    with __import__("torch").device("meta"):
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(big)).parameters())
    with tempfile.TemporaryDirectory() as tmp:
        lora = timed([PY, "bench/handwritten.py", "dpo", str(big), f"{tmp}/lora", *run_args])[2]
        full = timed([PY, "bench/handwritten.py", "dpo", str(big), f"{tmp}/full", "--full", *run_args])[2]
    print(f"\nDPO peak RSS on a {n_params / 1e6:.0f}M-parameter model ({' '.join(run_args) or '30 steps, batch 8, length 256'}): "
          f"LoRA (reference = adapter disabled) {lora:.0f} MiB, full fine-tuning (frozen reference copy) {full:.0f} MiB")


if __name__ == "__main__":
    main()
