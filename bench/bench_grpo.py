"""GRPO rollout throughput: the `grpo` stage against a hand-written TRL GRPO script on the same
data and settings (LoRA r 8 on all linear layers, 2 prompts × 4 completions per step, the same
max_completion_length, temperature 1, beta 0, a length reward, seed 42, no activation checkpointing —
TRL's GRPOConfig turns it on by default, medpipe's stages do not: the script sets it off to match).

    .venv/bin/python bench/bench_grpo.py [--model DIR] [--steps 4] [--reps 2] [--tokens 32]

Both sides read TRL's own per-step logs: rollout tokens/s = Σ (completions/mean_length × 8) /
Σ step_time over the steps (step_time: generation, scoring and the update of one step, as TRL
times it; model loading and data preparation excluded). Runs alternate stage / hand-written, each
in a fresh process and a fresh store; the RESULT line gives the ratio of the medians
(hand-written / stage: 1.00 = the same speed, > 1 = the stage is slower). Every child runs with 1
torch thread at `--nice` (default −10; its own session's autogroup too: bench/niced.py) so both
sides get the same share of a shared machine; each child's CPU seconds (os.wait4) and the load
average while they ran are printed beside the rates.

`--handwritten OUT` is the baseline itself (what a user writes with TRL directly)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import niced  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
DATA = REPO / "samples" / "mcq_rlvr_en.jsonl"
LR, BATCH, GENS = 1e-4, 8, 4


def handwritten(out: str, model_dir: str, steps: int, tokens: int) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from medpipe.data import load_records
    from medpipe.stages.rewards.answers import prompt_messages

    # the stage's prompt rows in the stage's order (medpipe's reader lists them, seed 0 as the
    # recipe's data.seed; TRL's sampler then shuffles both sides alike): the same prompts per step
    rows = [{"prompt": prompt_messages(r, "auto", [], False)}
            for r in load_records({"path": str(DATA), "format": "medqa"}, "mcq", seed=0).records]

    def length(prompts, completions, **kw):
        return [0.01 * len(c[0]["content"]) for c in completions]

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = GRPOConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH, num_generations=GENS,
                      max_completion_length=tokens, temperature=1.0, beta=0.0, learning_rate=LR, logging_steps=1,
                      save_steps=100000, report_to=[], use_cpu=True, bf16=False, seed=42, disable_tqdm=True,
                      gradient_checkpointing=False)  # TRL's GRPO default is True (~20 % slower); the stage's is false
    trainer = GRPOTrainer(model=model, reward_funcs=length, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                                       target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer.train()
    Path(out, "log_history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in trainer.state.log_history))


def stage(out: str, model_dir: str, steps: int, tokens: int, nice: int) -> tuple[Path, dict]:
    recipe = Path(out) / "bench_grpo.yaml"
    recipe.write_text(
        "defaults: [base, model: tiny, data: sample, _self_]\nname: bench_grpo\ntracking: []\nstages:\n"
        f"  grpo: {{kind: grpo, data: {{path: '{DATA}', format: medqa}}, max_steps: {steps}, batch_size: {BATCH}, "
        f"num_generations: {GENS}, max_completion_length: {tokens}, temperature: 1.0, beta: 0.0, lr: {LR}, "
        f"scheduler: linear, logging_steps: 1, save_steps: 100000, heldout_eval: false, ref_probe: false, "
        f"peft: {{r: 8, alpha: 16, dropout: 0.05}}, rewards: [{{name: length, scale: 0.01, unit: chars}}]}}\n")
    used = child([sys.executable, "-m", "medpipe.commands.cli", "run", f"recipe={recipe}", f"run.root={out}/runs",
                  f"run.dir={out}/runs/r", f"model.path={model_dir}"], nice)
    return next(Path(out, "runs", "r").glob("01-grpo/log_history.jsonl")), used


def child(cmd: list[str], nice: int) -> dict:
    used = niced.wait(niced.start(cmd, nice, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    if used["rc"]:
        raise SystemExit(f"failed ({used['rc']}): {' '.join(cmd)}")
    return used


def rollout_rate(log: Path) -> tuple[float, int, float]:
    """(completion tokens/s, completion tokens, prompt + completion tokens/s): the second rate also
    counts the prompts each step scores (TRL's cumulative num_tokens), so two sides whose steps drew
    prompts of other lengths compare on the work done."""
    steps = [h for h in map(json.loads, log.read_text().splitlines()) if "step_time" in h and "completions/mean_length" in h]
    tokens = sum(h["completions/mean_length"] * BATCH for h in steps)
    seconds = sum(h["step_time"] for h in steps)
    return tokens / seconds, int(tokens), steps[-1]["num_tokens"] / seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model dir (default: the tiny model)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--handwritten", default=None)
    ap.add_argument("--nice", type=int, default=-10, help="priority of every child (root: -10; else 0)")
    a = ap.parse_args()
    if a.model is None:
        from medpipe.stages.models.tiny import ensure_tiny

        a.model = str(ensure_tiny())
    if a.handwritten:
        return handwritten(a.handwritten, a.model, a.steps, a.tokens)
    rates: dict[str, list[float]] = {"stage": [], "handwritten": []}
    processed: dict[str, list[float]] = {"stage": [], "handwritten": []}
    load = [os.getloadavg()[0]]
    for rep in range(a.reps):
        for side in ("stage", "handwritten"):
            with tempfile.TemporaryDirectory() as tmp:
                if side == "stage":
                    log, used = stage(tmp, a.model, a.steps, a.tokens, a.nice)
                else:
                    used = child([sys.executable, __file__, "--handwritten", tmp, "--model", a.model, "--steps",
                                  str(a.steps), "--tokens", str(a.tokens)], a.nice)
                    log = Path(tmp, "log_history.jsonl")
                load.append(os.getloadavg()[0])
                rate, tokens, all_rate = rollout_rate(log)
                rates[side].append(rate)
                processed[side].append(all_rate)
                print(f"rep {rep} {side}: {rate:.1f} rollout tokens/s ({tokens} tokens in {a.steps} steps), "
                      f"{all_rate:.0f} prompt+completion tokens/s; process "
                      f"{used['cpu_s']:.0f} CPU s, {used['wall_s']:.0f} wall s; load {load[-1]:.1f}", flush=True)
    s, h = statistics.median(rates["stage"]), statistics.median(rates["handwritten"])
    ps, ph = statistics.median(processed["stage"]), statistics.median(processed["handwritten"])
    print(f"RESULT grpo rollout tokens/s: stage {s:.1f}, hand-written TRL {h:.1f}, hand-written/stage = {h / s:.3f}; "
          f"prompt+completion tokens/s: stage {ps:.0f}, hand-written {ph:.0f}, hand-written/stage = {ph / ps:.3f} "
          f"(model {Path(a.model).name}, {a.steps} steps, {BATCH} completions/step, {a.tokens} tokens, {a.reps} reps; "
          f"load average {min(load):.1f}–{max(load):.1f}, {time.strftime('%H:%M UTC', time.gmtime())})")


if __name__ == "__main__":
    main()
