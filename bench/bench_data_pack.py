"""Bench: tokenization + packing of 100k short records.

    .venv/bin/python bench/bench_data_pack.py [--n 100000] [--block 512]

Same run, same texts, same locally trained byte-level BPE (no network):
  naive      a per-record Python loop: tokenizer(text) per record, append EOS, cut blocks
  map x1     pack_texts: batched datasets.map (1000 rows/batch), one process
  map x2     pack_texts: batched datasets.map, num_proc=2
  cached     pack_texts rerun on the same cache_dir (datasets fingerprint hit, no tokenization)
Checks that every variant yields the same blocks, then prints rows/s and the speed-up.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def naive_pack(texts, tok, block):
    eos = tok.eos_token_id
    blocks, buf = [], []
    for t in texts:
        buf.extend(tok(t, add_special_tokens=False)["input_ids"])
        buf.append(eos)
        while len(buf) >= block:
            blocks.append(buf[:block])
            buf = buf[block:]
    return blocks


def _cpu() -> float:
    """CPU seconds of this process and its (joined) children: the workers of num_proc."""
    import resource
    me = resource.getrusage(resource.RUSAGE_SELF)
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + ch.ru_utime + ch.ru_stime


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--block", type=int, default=512)
    args = ap.parse_args()
    import datasets
    datasets.disable_progress_bars()
    from medpipe.data import pack_texts
    from medpipe.stages.models.toytok import build_tokenizer, sample_texts

    tok = build_tokenizer()
    texts = sample_texts(args.n, seed=1)
    n_chars = sum(len(t) for t in texts)
    print(f"{args.n} records, mean {n_chars / args.n:.0f} chars, block {args.block}, "
          f"cpus {os.cpu_count()}")
    rows, cpu = {}, {}
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    t0, c0 = time.perf_counter(), _cpu()
    ref = naive_pack(texts, tok, args.block)
    rows["naive per-record loop"] = time.perf_counter() - t0
    cpu["naive per-record loop"] = _cpu() - c0
    tmp = tempfile.mkdtemp()
    try:
        for name, nproc in (("pack_texts, batched map, 1 proc", None),
                            ("pack_texts, batched map, num_proc=2", 2)):
            d = os.path.join(tmp, name.replace(" ", "_").replace(",", ""))
            t0, c0 = time.perf_counter(), _cpu()
            ds = pack_texts(texts, tok, args.block, num_proc=nproc, cache_dir=d)
            rows[name] = time.perf_counter() - t0
            cpu[name] = _cpu() - c0
            assert ds["input_ids"] == ref, f"{name}: blocks differ from the naive loop"
            last = d
        t0, c0 = time.perf_counter(), _cpu()
        ds = pack_texts(texts, tok, args.block, cache_dir=last)
        rows["pack_texts rerun (cache hit)"] = time.perf_counter() - t0
        cpu["pack_texts rerun (cache hit)"] = _cpu() - c0
        assert len(ds) == len(ref)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = rows["naive per-record loop"]
    print(f"load average after: {os.getloadavg()[0]:.1f} (machine shared with other jobs: "
          f"wall times are noisy, CPU seconds less so)")
    print(f"| {'variant':38s} | {'wall s':>7s} | {'rows/s':>10s} | {'vs naive':>8s} | "
          f"{'CPU s':>6s} |")
    print(f"|{'-' * 40}|{'-' * 9}|{'-' * 12}|{'-' * 10}|{'-' * 8}|")
    for k, v in rows.items():
        print(f"| {k:38s} | {v:7.2f} | {args.n / v:10,.0f} | {base / v:7.1f}x | "
              f"{cpu[k]:6.2f} |")
    print(f"blocks: {len(ref)} x {args.block} tokens, 100% non-pad (last partial block dropped)")


if __name__ == "__main__":
    main()
