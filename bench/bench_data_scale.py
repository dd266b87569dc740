"""Bench: the data path at corpus scale (issue 14) — wall time and peak RSS at 10k / 100k / 1M.

    .venv/bin/python bench/bench_data_scale.py --sizes 10000 100000 [--tasks ...] [--before /tmp/before]

Writes synthetic files in the published shapes (alpaca JSON lines with Chinese text, ~0.9 KB a
record like the 1M-record file of the issue; ShareGPT multi-turn JSON lines; pretraining text)
and measures each task in a fresh child process: wall time, and peak RSS from the child's
``wait4`` rusage (ru_maxrss). Tasks:

  validate_before  what `medpipe validate` did for an SFT stage before (records as python dicts,
                   no tokenisation): ``load_records`` of the code at ``--before`` (a git worktree of
                   the commit before the change: ``git worktree add --detach /tmp/before 82da0e0``)
  encode_before    the SFT encoding before (template rendered twice per assistant turn, each piece
                   tokenised apart; the old functions are kept below) after that load_records
  validate_encode  what `medpipe validate` does now for an SFT stage = what `run` prepares: read and
                   validate as Arrow, render once, tokenise with offsets, masks, cuts, cache
  sharegpt         validate_encode on multi-turn ShareGPT records
  dedup            exact + MinHash near-dedup clusters (medpipe.data.dedup.clusters) of the texts
  packing          real (non-pad) / computed tokens of SFT batches, padded vs padding-free packed
  encode_profile   cProfile of the SFT encode path (_encode_many, one process): CPU s, top functions

peak_rss_mb is ru_maxrss (it counts the touched pages of memory-mapped Arrow files, which the
kernel can drop at will); peak_anon_mb is the peak anonymous memory (heap) of the task and its
workers, sampled.

Results go to stdout as JSON lines (one per task and size) and to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ZH = ("患者 发热 咳嗽 胸痛 高血压 糖尿病 治疗 诊断 急性 慢性 感染 抗生素 头痛 恶心 呕吐 腹泻 血常规 "
      "心电图 胰岛素 阿司匹林 肺炎 哮喘 过敏 建议 检查 休息 饮水 复查 医院 症状").split()
EN = "patient fever cough insulin aspirin diagnosis treatment acute chronic infection".split()


def _text(rng, k):
    return "".join(rng.choice(ZH) if rng.random() < 0.85 else " " + rng.choice(EN) + " " for _ in range(k))


def generate(d: str, n: int, shape: str) -> str:
    rng = random.Random(n)
    path = os.path.join(d, f"{shape}-{n}.jsonl")
    if os.path.exists(path):
        return path
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for i in range(n):
            if shape == "alpaca":
                rec = {"instruction": f"{i} " + _text(rng, rng.randint(8, 30)),
                       "input": _text(rng, rng.randint(0, 20)) if rng.random() < 0.3 else "",
                       "output": _text(rng, rng.randint(60, 200))}
            elif shape == "sharegpt":
                turns = []
                for _ in range(rng.randint(1, 4)):
                    turns += [{"from": "human", "value": f"{i} " + _text(rng, rng.randint(5, 30))},
                              {"from": "gpt", "value": _text(rng, rng.randint(20, 120))}]
                rec = {"conversations": turns}
            else:
                rec = {"text": _text(rng, rng.randint(50, 400))}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)
    return path


# ---- the SFT encoding as it was before (kept here to measure it) --------------------------------

def old_encode_chat(messages, tok, max_length):
    spans, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        spans += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    ids, mask = [], []
    for text, is_assistant in spans:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [int(is_assistant)] * len(piece)
    return {"input_ids": ids[:max_length], "assistant_masks": mask[:max_length]}


def old_encode_dataset(records, tok, max_length):
    from datasets import Dataset

    rows = [old_encode_chat(r["messages"], tok, max_length) for r in records]
    return Dataset.from_list([r for r in rows if any(r["assistant_masks"])])


# ---- child tasks ---------------------------------------------------------------------------------

def child(task: str, path: str, before: str, cache: str) -> dict:
    if task == "validate_before":
        sys.path.insert(0, before)  # a dir holding `medpipe` -> the old commit's pipeline/
        from medpipe.data import load_records

        res = load_records(path, "chat")
        return {"records": len(res.records)}
    if task == "encode_before":
        from transformers import AutoTokenizer

        from medpipe.data import load_records
        from medpipe.stages.models.tiny import ensure_tiny

        tok = AutoTokenizer.from_pretrained(ensure_tiny())
        recs = load_records(path, "chat").records
        ds = old_encode_dataset(recs, tok, 2048)
        return {"records": len(recs), "encoded": len(ds)}
    if task in ("validate_encode", "sharegpt"):
        from transformers import AutoTokenizer

        from medpipe.stages.models.tiny import ensure_tiny
        from medpipe.stages.sft import SFTParams
        from medpipe.stages.training.chat_data import prepare_chat_data

        tok = AutoTokenizer.from_pretrained(ensure_tiny())
        p = SFTParams(data=path, max_length=2048)
        out = prepare_chat_data(p, {"cache_dir": cache}, tok, __import__("pathlib").Path(cache), table=True)
        return {"records": out.stats.read, "encoded": len(out.train), "table": out.lines[2]}
    if task == "dedup":
        from medpipe.data import load_records
        from medpipe.data.dedup import clusters, record_key

        recs = load_records(path, "chat").records
        cl = clusters([record_key(r) for r in recs], near=True)
        return {"records": len(recs), "clusters": len(set(cl))}
    if task == "packing":
        return packing_ratio()
    if task == "encode_profile":
        return encode_profile(path)
    raise SystemExit(f"unknown task {task}")


def encode_profile(path: str, top: int = 8) -> dict:
    """Where the SFT encoding's time goes (cProfile, one process, batches of 256 as in the map):
    CPU seconds and the share of the top functions by own time. Profile CPU, not wall: on a
    shared machine the wall clock moves by 2x with the neighbours' load."""
    import cProfile
    import pstats

    from transformers import AutoTokenizer

    from medpipe.data import load_records
    from medpipe.stages.models.tiny import ensure_tiny
    from medpipe.stages.training import chat_data as cd

    convs = [r["messages"] for r in load_records(path, "chat").records]
    tok = AutoTokenizer.from_pretrained(ensure_tiny())
    shape, limits = cd.template_shape(tok), cd.Limits(2048)
    prof, c0 = cProfile.Profile(), time.process_time()
    prof.enable()
    for i in range(0, len(convs), 256):
        cd._encode_many(convs[i:i + 256], tok, shape, limits)
    prof.disable()
    cpu = time.process_time() - c0
    st = pstats.Stats(prof).stats
    rows = sorted(((v[2], f"{k[0].rsplit('/', 1)[-1]}:{k[1]}({k[2]})") for k, v in st.items()), reverse=True)[:top]
    total = sum(v[2] for v in st.values())   # profiled (wall) seconds: the Rust tokenizer runs on rayon threads
    return {"records": len(convs), "cpu_s": round(cpu, 2), "profiled_s": round(total, 2),
            "records_per_cpu_s": round(len(convs) / cpu), "top": [f"{own / total:.0%} {name}" for own, name in rows]}


def packing_ratio(max_length: int = 512, batch: int = 8, steps: int = 12) -> dict:
    """Real / computed tokens and tokens/s of tiny-model training steps on the sample ShareGPT +
    alpaca mix: padded batches (random order) against padding-free packed rows (TRL bfd)."""
    import random as _r

    import torch
    from transformers import AutoTokenizer
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from medpipe.data import load_records
    from medpipe.stages.models.loader import load_causal_lm
    from medpipe.stages.models.tiny import ensure_tiny
    from medpipe.stages.training.chat_data import encode_dataset

    tok = AutoTokenizer.from_pretrained(ensure_tiny())
    samples = os.path.join(HERE, "..", "samples")
    recs = load_records([os.path.join(samples, "sft_sharegpt.json"), os.path.join(samples, "sft_alpaca.json")],
                        "chat").records
    ds = encode_dataset(recs, tok, max_length)
    rows = [{"input_ids": r["input_ids"], "labels": [t if m else -100 for t, m in zip(r["input_ids"], r["assistant_masks"])]}
            for r in ds]
    _r.Random(0).shuffle(rows)
    pad = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id or 0)
    free = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id or 0, padding_free=True)
    padded = [pad(rows[i:i + batch]) for i in range(0, len(rows) - batch + 1, batch)]
    from datasets import Dataset

    packed_ds = pack_dataset(Dataset.from_list(rows), max_length, strategy="bfd")
    prow = packed_ds.to_list()
    packed = [free(prow[i:i + batch]) for i in range(0, len(prow) - batch + 1, batch)]
    real = sum(len(r["input_ids"]) for r in rows)
    out = {"conversations": len(rows), "real_tokens": real,
           "padded_ratio": round(real / sum(b["input_ids"].numel() for b in padded), 3),
           "packed_ratio": round(sum(int((b["position_ids"] >= 0).sum()) for b in packed) /
                                 sum(b["input_ids"].numel() for b in packed), 3),
           "padded_batches": len(padded), "packed_batches": len(packed)}
    model = load_causal_lm(ensure_tiny(), dtype=torch.float32, attn_implementation="sdpa")
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    for name, batches in (("padded", padded), ("packed", packed)):
        t0, toks = time.monotonic(), 0
        for b in batches[:steps]:
            b = dict(b)
            b.pop("seq_idx", None)
            keep = {k: v for k, v in b.items() if k in ("input_ids", "labels", "attention_mask", "position_ids")}
            loss = model(**keep, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            toks += int((b["labels"] != -100).sum()) if False else (int(b["attention_mask"].sum()) if "attention_mask" in b
                                                                   else b["input_ids"].numel())
        out[f"{name}_real_tokens_per_s"] = round(toks / (time.monotonic() - t0), 1)
    return out


def _watch_anon():
    """Peak anonymous RSS (RssAnon: heap, not the file-backed pages of memory-mapped Arrow files,
    which ru_maxrss counts too) of this process and its live workers, sampled every 0.2 s."""
    import threading

    peak = [0, 0, 0]  # main + workers, main alone, largest worker

    def rss_anon(pid):
        try:
            with open(f"/proc/{pid}/status") as f:
                for ln in f:
                    if ln.startswith("RssAnon:"):
                        return int(ln.split()[1])
        except OSError:
            return 0
        return 0

    def kids():
        try:
            with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return []

    def loop():
        while True:
            main, workers = rss_anon(os.getpid()), [rss_anon(k) for k in kids()]
            peak[0] = max(peak[0], main + sum(workers))
            peak[1] = max(peak[1], main)
            peak[2] = max([peak[2], *workers])
            time.sleep(0.2)

    threading.Thread(target=loop, daemon=True).start()
    return lambda: list(peak)


def run_child_measured(task, path, before, cache):
    """Start the child and reap it with os.wait4 ourselves (ru_maxrss of that child alone)."""
    t0 = time.monotonic()
    env = dict(os.environ, MEDPIPE_PROGRESS="0")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.dup2(w, 1)
        os.close(r)
        os.execve(sys.executable, [sys.executable, __file__, "--child", task, "--file", path, "--before", before,
                                   "--cache", cache], env)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    _, status, usage = os.wait4(pid, 0)
    wall = time.monotonic() - t0
    lines = b"".join(chunks).decode().strip().splitlines()
    ok = os.waitstatus_to_exitcode(status) == 0 and lines
    info = json.loads(lines[-1]) if ok else {"error": f"exit {os.waitstatus_to_exitcode(status)}"}
    return {"task": task, "wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), **info}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--tasks", nargs="+", default=["validate_before", "validate_encode", "encode_before", "dedup"])
    ap.add_argument("--before", default="/tmp/before_pkg")
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "medpipe-bench-scale"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--max-encode-before", type=int, default=10_000, help="encode_before only up to this size")
    ap.add_argument("--max-dedup", type=int, default=100_000)
    ap.add_argument("--child")
    ap.add_argument("--file")
    ap.add_argument("--cache")
    args = ap.parse_args()
    if args.child:
        peak = _watch_anon()
        res = child(args.child, args.file, args.before, args.cache)
        total, main, worker = peak()
        # forked workers share the parent's pages copy-on-write: the sum counts those more than once
        res.update(peak_anon_mb=round(total / 1024, 1), peak_anon_main_mb=round(main / 1024, 1),
                   peak_anon_worker_mb=round(worker / 1024, 1))
        print(json.dumps(res))
        return
    os.makedirs(args.dir, exist_ok=True)
    results = []
    for n in args.sizes:
        for task in args.tasks:
            if task == "encode_before" and n > args.max_encode_before or task == "dedup" and n > args.max_dedup:
                continue
            if task == "packing" and n != args.sizes[0]:
                continue
            path = generate(args.dir, n, "sharegpt" if task == "sharegpt" else "alpaca")
            cache = tempfile.mkdtemp(dir=args.dir, prefix="cache-")
            res = {"n": n, "file_mb": round(os.path.getsize(path) / 2**20, 1), **run_child_measured(task, path,
                                                                                                  args.before, cache)}
            __import__("shutil").rmtree(cache, ignore_errors=True)
            print(json.dumps(res, ensure_ascii=False), flush=True)
            results.append(res)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            for r in results:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
