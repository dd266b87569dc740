"""Batched multiple-choice scoring in the eval stage vs one item at a time (issue: eval).

The tiny default model (medpipe.stages.models.tiny, Qwen2 hidden 128 × 2 layers, byte-level BPE) on every
bundled mcq sample (CMExam, MedQA, MedMCQA, PubMedQA with contexts, C-Eval val: 230 items, zh + en,
3-5 options). Same process, order rotated every rep, median of --reps after a warm-up pass.

    /work/main/.venv/bin/python bench/bench_eval_mcq.py [--reps 5 --batch-size 32 --threads 2]

Rows (scoring only; prompts are built once, the model is loaded once):
  cue loop         - one item at a time, written plainly: tokenize, model(ids) with full logits,
                     the valid letters' logits at the last position (what batching replaces);
  cue  bs=1 / bs=N - `medpipe.stages.evaluation.scoring.letter_logits` (answer-cue letter logits, sorted by
                     length, left padding, last-position logits only), 1 vs N prompts per forward;
  ppl  bs=1 / bs=N - option perplexity as the eval stage runs it
                     (`medpipe.stages.evaluation.scoring.score_options_ppl`), one item per call vs N rows.
RESULT lines: cue bs=N against the plain loop and against bs=1, ppl bs=N against bs=1;
predictions must be identical across variants.

5-shot C-Eval (as C-Eval is reported: 5 solved dev examples in front of every item; the bundled
ceval_val.csv, shots from ceval_dev.csv):
  5-shot loop          - the plain loop above on the 5-shot prompts;
  5-shot bs=N plain    - letter_logits with share_prefix=False (rows independent);
  5-shot bs=N prefix   - letter_logits as the eval stage runs it: the shots' tokens, common to the
                         subject's items, run once through the KV cache (medpipe.stages.inference.prefix).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=None, help="default: the eval stage's batch_size")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    from medpipe.compose import package_dir
    from medpipe.stages.eval import EvalParams
    from medpipe.stages.evaluation.prompts import cue_prompt, pick_shots
    from medpipe.stages.evaluation.scoring import letter_logits, letter_token_ids, score_options_ppl
    from medpipe.stages.evaluation.sets import plan_sets
    from medpipe.stages.inference.backends import open_backend
    from medpipe.artifact import Artifact
    from medpipe.stages.models.tiny import ensure_tiny

    torch.set_num_threads(args.threads)
    args.batch_size = args.batch_size or EvalParams().batch_size
    s = str(package_dir("samples"))
    data = [{"path": f"{s}/mcq_cmexam.csv", "format": "cmexam"}, {"path": f"{s}/mcq_medqa.jsonl", "format": "medqa"},
            {"path": f"{s}/medmcqa.json", "format": "medmcqa", "cop_base": 1},
            {"path": f"{s}/pubmedqa.json", "format": "pubmedqa"}, {"path": f"{s}/ceval_val.csv", "format": "ceval"}]
    items = [r for st in plan_sets(EvalParams(data=data)) for r in st.records]
    tiny = str(ensure_tiny())
    runner = open_backend(Artifact(stage="base", kind="model", format="full", model_path=tiny, tokenizer_path=tiny))
    model, tok = runner.model, runner.tok
    prompts = [cue_prompt(it, "auto", []) for it in items]
    letters = [list(it["options"]) for it in items]
    ntok = [len(tok(p)["input_ids"]) for p in prompts]

    cand = letter_token_ids(tok, sorted({x for ls in letters for x in ls}))

    def loop():
        out = []
        with torch.no_grad():
            for p, ls in zip(prompts, letters):
                ids = torch.tensor([tok(p)["input_ids"]], device=model.device)
                last = model(input_ids=ids).logits[0, -1]
                out.append(max(ls, key=lambda x: float(last[cand[x]].max())))
        return out

    def cue(bs):
        out = letter_logits(model, tok, prompts, letters, batch_size=bs)
        return [max(x, key=x.get) for x in out]

    def ppl(bs):
        if bs == 1:
            return [score_options_ppl([it], model, tok, batch_size=len(it["options"]))[0]["pred"] for it in items]
        return [r["pred"] for r in score_options_ppl(items, model, tok, batch_size=bs)]

    pool = plan_sets(EvalParams(data={"path": f"{s}/ceval_dev.csv", "format": "ceval"}))[0].records
    ceval = plan_sets(EvalParams(data={"path": f"{s}/ceval_val.csv", "format": "ceval"}))[0].records
    k_prompts = [cue_prompt(it, "auto", pick_shots(it, pool, 5)) for it in ceval]
    k_letters = [list(it["options"]) for it in ceval]
    k_tok = [len(tok(p)["input_ids"]) for p in k_prompts]

    def loop_on(ps, ls_):
        out = []
        with torch.no_grad():
            for p, ls in zip(ps, ls_):
                last = model(input_ids=torch.tensor([tok(p)["input_ids"]], device=model.device)).logits[0, -1]
                out.append(max(ls, key=lambda x: float(last[cand[x]].max())))
        return out

    def kshot(share):
        out = letter_logits(model, tok, k_prompts, k_letters, batch_size=args.batch_size, share_prefix=share)
        return [max(x, key=x.get) for x in out]

    variants = {"cue loop": loop, "cue bs=1": lambda: cue(1), f"cue bs={args.batch_size}": lambda: cue(args.batch_size),
                "ppl bs=1": lambda: ppl(1), f"ppl bs={args.batch_size}": lambda: ppl(args.batch_size),
                "5-shot loop": lambda: loop_on(k_prompts, k_letters), "5-shot plain": lambda: kshot(False),
                "5-shot prefix": lambda: kshot(True)}
    preds = {k: f() for k, f in variants.items()}  # warm-up + predictions
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for rep in range(args.reps):
        for k in names[rep % len(names):] + names[: rep % len(names)]:
            t0 = time.perf_counter()
            variants[k]()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{len(items)} items, prompt tokens mean {statistics.mean(ntok):.0f} max {max(ntok)}, "
          f"torch threads {args.threads}, reps {args.reps}")
    print(f"5-shot: {len(ceval)} C-Eval items, prompt tokens mean {statistics.mean(k_tok):.0f} max {max(k_tok)}")
    for k in names:
        n = len(ceval) if k.startswith("5-shot") else len(items)
        print(f"{k:<14} median {med[k]:.3f}s  {n / med[k]:8.1f} items/s  "
              f"(min {min(times[k]):.3f} max {max(times[k]):.3f})")
    same = sum(a == b for a, b in zip(preds["cue loop"], preds[f"cue bs={args.batch_size}"]))
    print(f"RESULT cue vs loop: batched {med['cue loop'] / med[f'cue bs={args.batch_size}']:.2f}x the throughput of "
          f"one-at-a-time scoring (same prediction for {same}/{len(items)} items)")
    for m in ("cue", "ppl"):
        one, batched = f"{m} bs=1", f"{m} bs={args.batch_size}"
        same = sum(a == b for a, b in zip(preds[one], preds[batched]))
        print(f"RESULT {m} vs bs=1: batched {med[one] / med[batched]:.2f}x the throughput of one-at-a-time "
              f"(same prediction for {same}/{len(items)} items)")
    same = sum(a == b == c for a, b, c in zip(preds["5-shot loop"], preds["5-shot plain"], preds["5-shot prefix"]))
    print(f"RESULT 5-shot: shared-prefix batched {med['5-shot loop'] / med['5-shot prefix']:.2f}x one-at-a-time, "
          f"{med['5-shot plain'] / med['5-shot prefix']:.2f}x batched without prefix sharing "
          f"(same prediction for {same}/{len(ceval)} items)")
    print(json.dumps({"items": len(items), "median_s": med}))


if __name__ == "__main__":
    main()
