"""The memory plan (medpipe.memplan) beside the measured peak: every training stage of the four
recipes, each trained alone in its own process (`medpipe run ... --only STAGE`, local launcher,
one CPU process, fp32), its peak RSS read by os.wait4 (ru_maxrss), and its RSS sampled every 0.5 s
to give training's own peak (up to the stage log's `distributed:` line; after it come the save and
the LoRA merge). The baseline is the peak RSS of a process that imports what a training stage
imports (torch, the transformers / trl / peft trainer stack, tensorboard) and validates the same recipe: `measured - baseline` is what the stage itself added, compared with
the plan's total minus its CPU runtime constant (memplan.CPU_RUNTIME).

    python bench/bench_memplan.py                      # tiny model, the four recipes
    python bench/bench_memplan.py --model smollm2-135m --recipes qilin   # SmolLM2-135M (slow on CPU)
    # one stage alone, started from the base model instead of its upstream (no CPT run first)
    python bench/bench_memplan.py --model smollm2-135m --recipes antglm --stages sft cpoly \
        --set stages.sft.from=base stages.cpoly.from=sft

Stages run with 3 optimizer steps (`--steps`; the peak is reached at the first optimizer step); eval stages
nobody trains from are dropped. Prints one markdown table row per stage.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPES = ("qilin", "medcare", "iimedgpt", "antglm")
STEPS = 3
# what a training stage process imports before its model (transformers and trl import lazily: name
# the trainer stack itself), for the baseline process
IMPORTS = ("import torch, datasets, accelerate; from transformers import Trainer, TrainingArguments, "
           "AutoModelForCausalLM; from trl import SFTTrainer, DPOTrainer; from peft import get_peft_model; "
           "from torch.utils.tensorboard import SummaryWriter; ")


def peak_rss(cmd: list[str], log: Path, samples: list | None = None) -> tuple[int, float, int]:
    """(exit code, seconds, peak RSS in bytes) of a child process, by wait4; with `samples`, also
    its VmRSS every half second as (unix time, bytes) (to tell training's peak from saving's)."""
    import threading

    t0 = time.monotonic()
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.5):
                try:
                    text = Path(f"/proc/{proc.pid}/status").read_text()
                except OSError:
                    return
                kb = next((int(line.split()[1]) for line in text.splitlines() if line.startswith("VmRSS:")), None)
                if kb is not None:
                    samples.append((time.time(), kb * 1024))

        if samples is not None:
            threading.Thread(target=sample, daemon=True).start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.monotonic() - t0, usage.ru_maxrss * 1024


def training_peak(run_dir: Path, stage: str, samples: list) -> int | None:
    """The highest sampled RSS up to the end of training: the stage log's `distributed:` line (written
    after trainer.train returns, before the model is saved and, for LoRA, merged into `merged/`)."""
    import datetime

    logs = list(run_dir.glob(f"*-{stage}/logs/rank0.log"))
    line = next((ln for ln in logs[0].read_text().splitlines() if " distributed: " in ln), None) if logs else None
    if line is None:
        return None
    end = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    during = [rss for t, rss in samples if t <= end]
    return max(during) if during else None


def overrides_for(recipe: str, model: str, root: Path, extra: list[str], steps: int = STEPS) -> tuple[list[str], list]:
    """Overrides that keep each training stage to a few steps and drop the evals nobody reads
    from (after the caller's `extra` ones); and the bound stage plans (in order)."""
    from medpipe.compose import bind_stages, compose

    base = [f"model={model}", f"run.root={root}", f"run.dir={root / recipe}", *extra]
    cfg, _ = compose(recipe, base)
    plans = bind_stages(cfg)
    sources = {p.source for p in plans}
    out = list(base)
    for p in plans:
        if not getattr(p.cls, "trains", True) and p.name not in sources and getattr(p.cls, "evaluates", False):
            out.append(f"~stages.{p.name}")
        elif hasattr(p.params, "batch_layout") and getattr(p.cls, "trains", True):
            out += [f"stages.{p.name}.max_steps={steps}", f"stages.{p.name}.save_steps=1000"]
            if hasattr(p.params, "reward_eval_pairs"):
                out.append(f"stages.{p.name}.reward_eval_pairs=0")
    cfg, _ = compose(recipe, out)
    return out, bind_stages(cfg)


def needed(plans: list, stages: list[str]) -> set[str]:
    """The stages that `stages` train from, transitively (they run first, unmeasured rows too)."""
    by_name, out = {p.name: p for p in plans}, set()
    todo = [by_name[s].source for s in stages if s in by_name]
    while todo:
        name = todo.pop()
        if name in by_name and name not in out:
            out.add(name)
            todo.append(by_name[name].source)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES))
    ap.add_argument("--root", default=None, help="runs root (default: a temporary dir)")
    ap.add_argument("--steps", type=int, default=STEPS, help="optimizer steps per stage (Adam's state exists from the first)")
    ap.add_argument("--stages", nargs="*", default=None,
                    help="measure only these stages (with what they train from; default: every training stage)")
    ap.add_argument("--set", nargs="*", default=[], dest="extra",
                    help="extra recipe overrides, e.g. stages.sft.from=base to start a stage from the base model")
    args = ap.parse_args()
    from medpipe import memplan
    from medpipe.compose import compose

    root = Path(args.root or tempfile.mkdtemp(prefix="bench_memplan-"))
    log = root / "bench.log"
    root.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    rows = []
    for recipe in args.recipes:
        ov, plans = overrides_for(recipe, args.model, root, args.extra, args.steps)
        imports = IMPORTS + "from medpipe.commands.cli import app; "
        code, _, base = peak_rss([py, "-c", imports + f"app({['validate', f'recipe={recipe}', *ov]!r})"], log)
        assert code == 0, f"baseline for {recipe} failed: see {log}"
        print(f"{recipe}: baseline peak RSS {base / 2**20:.0f} MiB", flush=True)
        cfg, _ = compose(recipe, ov)
        memories, where = memplan.plan_recipe(cfg, plans)
        planned = {m.stage: m for m in memories}
        for p in plans:
            if not getattr(p.cls, "trains", True) and getattr(p.cls, "evaluates", False):
                continue
            if args.stages is not None and p.name not in args.stages and p.name not in needed(plans, args.stages):
                continue
            samples: list = []
            code, secs, peak = peak_rss([py, "-m", "medpipe.commands.cli", "run", f"recipe={recipe}", *ov,
                                         "--only", p.name], log, samples)
            assert code == 0, f"{recipe}/{p.name} failed: see {log}"
            m = planned.get(p.name)
            if m is None:
                continue
            est, runtime = m.total, m.parts["runtime"]
            ratio, dratio = est / peak, (est - runtime) / max(peak - base, 1)
            trained = training_peak(root / recipe, p.name, samples)
            during = f"{trained / 2**20:.0f} ({est / trained:.2f})" if trained else "?"
            rows.append(f"| {args.model} | {recipe} | {p.name} ({p.kind}) | {m.tokens} | {est / 2**20:.0f} | "
                        f"{peak / 2**20:.0f} | {ratio:.2f} | {during} | {(est - runtime) / 2**20:.0f} | "
                        f"{(peak - base) / 2**20:.0f} | {dratio:.2f} | {secs:.0f} |")
            print(rows[-1], flush=True)
    print("\n| model | recipe | stage | tokens/forward | plan MiB | peak RSS MiB | plan/peak | "
          "training's peak MiB (plan/it) | plan − runtime MiB | peak − baseline MiB | ratio | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print(f"(baseline processes' peak RSS: imports + validate; log {log})")


if __name__ == "__main__":
    main()
