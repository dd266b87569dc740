"""Batched generation (medpipe.stages.inference.runtime.LocalModel.generate, as the eval stage, chat and serve use it)
vs one prompt at a time on the tiny default model (issue: eval).

Prompts: the first --n user turns of the bundled SFT samples (alpaca, zh + en) through the chat
template; greedy; exactly --new tokens each (`ignore_eos`, so both variants produce the same
number of tokens). Same process, order rotated every rep, median of --reps after a warm-up.

    /work/main/.venv/bin/python bench/bench_eval_generate.py [--n 32 --new 32 --batch-size 16 --reps 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    from medpipe.stages.inference.runtime import LocalModel
    from medpipe.compose import package_dir
    from medpipe.stages.eval import EvalParams
    from medpipe.stages.evaluation.sets import plan_sets
    from medpipe.stages.models.tiny import ensure_tiny

    torch.set_num_threads(args.threads)
    s = str(package_dir("samples"))
    recs = plan_sets(EvalParams(data={"path": f"{s}/sft_alpaca.json", "format": "alpaca", "limit": args.n}))[0].records
    tiny = str(ensure_tiny())
    model = LocalModel(tiny, tiny)
    prompts = [model.render(r["messages"][:-1]) for r in recs]
    ntok = [len(model.encode(p)) for p in prompts]

    def run(bs):
        return [c.text for c in model.generate(prompts, max_new_tokens=args.new, batch_size=bs, ignore_eos=True)]

    variants = {"one at a time": lambda: run(1), f"batched bs={args.batch_size}": lambda: run(args.batch_size)}
    outs = {k: f() for k, f in variants.items()}
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for rep in range(args.reps):
        for k in names[rep % 2:] + names[: rep % 2]:
            t0 = time.perf_counter()
            variants[k]()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    total = args.n * args.new
    print(f"{args.n} prompts (tokens mean {statistics.mean(ntok):.0f}, max {max(ntok)}), {args.new} new tokens each, "
          f"torch threads {args.threads}, reps {args.reps}")
    for k in names:
        print(f"{k:<16} median {med[k]:.3f}s  {total / med[k]:8.1f} tokens/s  (min {min(times[k]):.3f} max {max(times[k]):.3f})")
    same = sum(a == b for a, b in zip(outs[names[0]], outs[names[1]]))
    print(f"RESULT generation: batched {med[names[0]] / med[names[1]]:.2f}x the throughput of one-at-a-time "
          f"(identical greedy output for {same}/{args.n} prompts)")
    print(json.dumps({"prompts": args.n, "new_tokens": args.new, "median_s": med}))


if __name__ == "__main__":
    main()
