"""protocol=lm-eval vs lm-eval-harness itself: CPU seconds per 100 items on the same items and model,
in the same process, plus agreement (same prediction per item, max |log-likelihood difference|).

Both sides start from what a run has already paid once: the model loaded (medpipe's eval backend;
lm-eval's HFLM, batch 8 = lm-eval's usual CPU setting, medpipe's default batch 16) and the data
read (medpipe's plan_sets; lm-eval's task objects from local task YAMLs,
stages/evaluation/protocols/lmeval_tasks.py). Timed: medpipe `eval_mcq` (prompts, tokenisation,
log-likelihoods, acc/acc_norm) vs lm-eval `evaluator.evaluate` (requests, tokenisation,
log-likelihoods, metrics); CPU = time.process_time (all threads). Median of --reps, alternating
which side runs first.

    .venv/bin/python bench/bench_eval_protocols.py [--reps 3] [--threads 2] [--model DIR] [--limit N]

`--model`: a local HF model directory instead of the tiny one (e.g. a real 135M model, where the
vocabulary is 49k: lm-eval takes logits at every position, medpipe at the prompt's last one);
`--limit`: the first N items of each set (lm-eval's --limit).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lm-eval-batch-size", type=int, default=8)
    ap.add_argument("--model", default=None, help="local HF model dir (default: the tiny model)")
    ap.add_argument("--limit", type=int, default=None, help="first N items of every set")
    args = ap.parse_args()
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[k] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import torch
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    from medpipe.artifact import Artifact
    from medpipe.compose import package_dir
    from medpipe.stages.eval import EvalParams
    from medpipe.stages.evaluation.protocols.lmeval_tasks import write_tasks
    from medpipe.stages.evaluation.runner import eval_mcq
    from medpipe.stages.evaluation.sets import plan_sets
    from medpipe.stages.inference.backends import open_backend
    from medpipe.stages.models.tiny import ensure_tiny

    torch.set_num_threads(args.threads)
    s = str(package_dir("samples"))
    files = {"medqa_4options": (f"{s}/mcq_medqa.jsonl", "medqa"), "medmcqa": (f"{s}/medmcqa.json", "medmcqa"),
             "pubmedqa": (f"{s}/pubmedqa.json", "pubmedqa")}
    tiny = args.model or str(ensure_tiny())
    tmp = tempfile.mkdtemp(prefix="bench_protocols_")
    names = write_tasks(tmp, {t: f for t, (f, _) in files.items()})
    manager = TaskManager(include_path=tmp)
    lm = HFLM(pretrained=tiny, dtype="float32", batch_size=args.lm_eval_batch_size, device="cpu")
    p = EvalParams(data=[{"path": f, "format": fmt, "task": t} for t, (f, fmt) in files.items()], protocol="lm-eval",
                   limit=args.limit)
    backend = open_backend(Artifact(stage="base", kind="model", format="full", model_path=tiny, tokenizer_path=tiny))
    sets = plan_sets(p)

    def medpipe_run():
        return {st.name: eval_mcq(st, p, backend, [], None)[1] for st in sets}

    def lm_eval_run():
        tasks = get_task_dict(names, manager)  # built outside the clock
        t0 = time.process_time()
        out = evaluator.evaluate(lm=lm, task_dict=tasks, limit=args.limit, log_samples=True, verbosity="ERROR")
        return out, time.process_time() - t0

    cpu = {"medpipe": [], "lm_eval": []}
    ours = theirs = None
    for rep in range(args.reps):
        for side in (("medpipe", "lm_eval") if rep % 2 == 0 else ("lm_eval", "medpipe")):
            if side == "medpipe":
                t0 = time.process_time()
                ours = medpipe_run()
                cpu["medpipe"].append(time.process_time() - t0)
            else:
                theirs, dt = lm_eval_run()
                cpu["lm_eval"].append(dt)
    n = sum(len(st.records) for st in sets)
    same = worst = 0
    for task, name in zip(files, names):
        ref = sorted(theirs["samples"][name], key=lambda r: r["doc_id"])
        for o, t in zip(ours[task], ref):
            lls = [float(x[0]) for x in t["filtered_resps"]]
            letters = list(o["scores"])
            same += o["pred"] == [letters[max(range(len(lls)), key=lls.__getitem__)]]
            worst = max(worst, max(abs(o["scores"][k] - ll) for k, ll in zip(letters, lls)))
    med = {k: statistics.median(v) for k, v in cpu.items()}
    per100 = {k: v * 100 / n for k, v in med.items()}
    print(f"{n} items (MedQA 4-option {len(sets[0].records)}, MedMCQA {len(sets[1].records)}, "
          f"PubMedQA {len(sets[2].records)}), {'tiny Qwen2' if not args.model else args.model} fp32, torch threads {args.threads}, reps {args.reps}")
    for k in cpu:
        print(f"{k:<8} CPU median {med[k]:.2f}s = {per100[k]:.2f}s per 100 items (all reps: "
              + ", ".join(f"{x:.2f}" for x in cpu[k]) + ")")
    print(f"RESULT eval protocols: protocol=lm-eval {per100['medpipe']:.2f} vs lm_eval {per100['lm_eval']:.2f} CPU s per "
          f"100 items ({per100['lm_eval'] / per100['medpipe']:.2f}x less CPU; same prediction for {same}/{n} items, "
          f"max |log-likelihood diff| {worst:.1e})")
    print(json.dumps({"items": n, "cpu_s_median": med, "cpu_s_per_100": per100, "same_pred": same, "max_ll_diff": worst}))


if __name__ == "__main__":
    main()
