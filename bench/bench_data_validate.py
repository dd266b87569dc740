"""Bench: validation of 100k records (read + per-record checks + duplicate counting + mixing).

    .venv/bin/python bench/bench_data_validate.py [--n 100000] [--budget 10]

Generates three files in public shapes (alpaca JSON-lines, MedQA jsonl, CMExam CSV with
multi-line quoted options; ~n/3 records each), then times ``load_records`` on all of them
(want=chat: MCQ rendered to chat), and once more with a tokenizer (token-length percentiles
and the over-length check). Asserts the plain validation stays within the budget (seconds).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def generate(d: str, n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ("patient fever cough chest pain hypertension diabetes insulin aspirin renal "
             "hepatic cardiac infection antibiotic diagnosis treatment acute chronic").split()
    zh = "患者 发热 咳嗽 胸痛 高血压 糖尿病 治疗 诊断 急性 慢性 感染 抗生素".split()
    s = lambda k, w=words: " ".join(rng.choice(w) for _ in range(k))  # noqa: E731
    k = n // 3
    a = os.path.join(d, "alpaca.jsonl")
    with open(a, "w", encoding="utf-8") as f:
        for i in range(n - 2 * k):
            f.write(json.dumps({"instruction": f"Q{i} {s(12)}?", "input": s(rng.randint(0, 10)),
                                "output": s(rng.randint(10, 40))}) + "\n")
    m = os.path.join(d, "medqa.jsonl")
    with open(m, "w", encoding="utf-8") as f:
        for i in range(k):
            opts = {L: s(3) for L in "ABCDE"}
            f.write(json.dumps({"question": f"{i} {s(25)}?", "answer": opts["C"], "options": opts,
                                "meta_info": "step1", "answer_idx": "C",
                                "metamap_phrases": [s(2)]}) + "\n")
    c = os.path.join(d, "cmexam.csv")
    with open(c, "w", encoding="utf-8-sig", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Question", "Options", "Answer", "Explanation", "Clinical Department",
                    "Medical Discipline", "Competency", "Difficulty level"])
        for i in range(k):
            opts = "\n".join(f"{L} {s(3, zh)}" for L in "ABCDE")
            w.writerow([f"{i}{s(15, zh)}", opts, rng.choice("ABCDE"), s(20, zh), "内科", "内科学",
                        "诊断", "中"])
    return [a, m, c]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--budget", type=float, default=10.0)
    args = ap.parse_args()
    from medpipe.data import load_records
    from medpipe.stages.models.toytok import build_tokenizer

    with tempfile.TemporaryDirectory() as d:
        files = generate(d, args.n)
        print(f"load average before: {os.getloadavg()[0]:.1f}")
        t0, c0 = time.perf_counter(), time.process_time()
        res = load_records(files, "chat", seed=0)
        t_plain = time.perf_counter() - t0
        c_plain = time.process_time() - c0
        n = sum(r.records for r in res.reports)
        print(res.summary_table())
        print(f"validate {n} records (3 formats, want=chat): {t_plain:.2f} s wall, "
              f"{c_plain:.2f} s CPU ({n / t_plain:,.0f} records/s)")
        tok = build_tokenizer()
        t0, c0 = time.perf_counter(), time.process_time()
        res2 = load_records(files, "chat", seed=0, tokenizer=tok, max_length=2048)
        t_tok = time.perf_counter() - t0
        c_tok = time.process_time() - c0
        print(res2.summary_table())
        print(f"validate + token lengths (byte-level BPE, vocab 2000, max_length 2048): "
              f"{t_tok:.2f} s wall, {c_tok:.2f} s CPU ({n / t_tok:,.0f} records/s; percentiles "
              f"from a 10k sample per source, over-length checked on every record)")
        print(f"load average after: {os.getloadavg()[0]:.1f}")
        assert n == args.n, n
        assert t_plain <= args.budget, f"validation took {t_plain:.1f} s > {args.budget} s"
        print(f"OK: {t_plain:.2f} s <= {args.budget} s budget")


if __name__ == "__main__":
    main()
