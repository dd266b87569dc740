"""Batched option-perplexity scoring (medpipe.stages.evaluation.scoring.score_options_ppl) vs one forward per
option (issue 8). Small random Qwen2 (hidden 256, 4 layers) + an in-memory word tokenizer,
64 items x 4 options. Same process, interleaved reps, median after a warm-up pass.

    /work/main/.venv/bin/python bench/bench_option_scoring.py [--items 64 --batch-size 32 --reps 5]

Rows:
  loop        - naive: for each item, for each option, model(prompt + option) with full logits,
                log_softmax, NLL of the option tokens (what the batched code replaces);
  flat bs=N   - score_options_ppl(share_prompt=False): (item, option) sequences right-padded,
                N per forward, logits only from the first option token on;
  shared bs=N - score_options_ppl() default: prompts once with a KV cache, options batched on
                top of the gathered cache (N = option rows per batch, items never split).
The RESULT line is the default (shared, bs=32) against the loop.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch


def build(vocab_size: int, seed: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words: set[str] = set()
    while len(words) < vocab_size - 40:
        words.add("".join(rng.choice(letters) for _ in range(rng.randint(3, 9))))
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for w in ["Question", "Answer", "Context", ":", ".", "?", ",", *"ABCDE"] + sorted(words):
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                  unk_token="<unk>")
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(vocab), hidden_size=256, intermediate_size=688,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).eval()
    return tok, model, sorted(words)


def make_items(words: list[str], n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    items = []
    for i in range(n):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) + " ?"
        ctx = " ".join(rng.choice(words) for _ in range(rng.randint(0, 40))) or None
        opts = {k: " ".join(rng.choice(words) for _ in range(rng.randint(1, 8))) for k in "ABCD"}
        items.append({"id": f"q{i}", "question": q, "context": ctx, "options": opts, "answer": ["A"]})
    return items


def naive_loop(items, model, tok):
    from medpipe.stages.evaluation.prompts import build_ppl_prompt

    out = []
    with torch.no_grad():
        for it in items:
            prompt, conts = build_ppl_prompt(it)
            p_ids = tok(prompt)["input_ids"]
            scores = {}
            for k, c in conts.items():
                c_ids = tok(c, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([p_ids + c_ids])
                lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
                tgt = ids[0, 1:]
                scores[k] = float(-lp[torch.arange(len(tgt)), tgt][len(p_ids) - 1:].mean())
            out.append({"id": it["id"], "scores": scores, "pred": min(scores, key=scores.get)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from medpipe.stages.evaluation.scoring import score_options_ppl

    tok, model, words = build(args.vocab, 0)
    items = make_items(words, args.items, 1)
    n_seq = sum(len(it["options"]) for it in items)
    avg_len = statistics.mean(len(tok(build_ppl_prompt_text(it))["input_ids"]) for it in items)

    bs = args.batch_size
    runs = {
        "loop (1 fwd/option, full logits)": lambda: naive_loop(items, model, tok),
        "flat bs=1": lambda: score_options_ppl(items, model, tok, batch_size=1, share_prompt=False),
        f"flat bs={bs}": lambda: score_options_ppl(items, model, tok, batch_size=bs, share_prompt=False),
        "shared bs=1 (1 item/batch)": lambda: score_options_ppl(items, model, tok, batch_size=1),
        f"shared bs={bs} (default)": lambda: score_options_ppl(items, model, tok, batch_size=bs),
    }
    results = {k: fn() for k, fn in runs.items()}  # warm-up + agreement check
    ref = results["loop (1 fwd/option, full logits)"]
    max_diff = max(abs(a["scores"][k] - b["scores"][k]) for name, res in results.items()
                   for a, b in zip(ref, res) for k in a["scores"])
    same_pred = all(a["pred"] == b["pred"] for res in results.values() for a, b in zip(ref, res))
    times: dict[str, list[float]] = {k: [] for k in runs}
    keys = list(runs)
    for rep in range(args.reps):
        for k in keys[rep % len(keys):] + keys[:rep % len(keys)]:  # rotate the order every rep
            fn = runs[k]
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["loop (1 fwd/option, full logits)"]
    print(f"Qwen2 hidden 256 x 4 layers, vocab {len(tok)}; {args.items} items x 4 options "
          f"({n_seq} sequences, mean prompt {avg_len:.0f} tokens); threads={args.threads} "
          f"reps={args.reps} (median s)")
    print(f"max |score diff| vs loop: {max_diff:.2e}; same predictions: {same_pred}")
    for k, v in med.items():
        print(f"  {k:36s} {v:7.3f} s   speed-up vs loop {base / v:5.2f}x")
    sp = base / med[f"shared bs={bs} (default)"]
    print(f"RESULT batched speed-up = {sp:.2f}x (target >= 3) -> {'PASS' if sp >= 3 else 'FAIL'}")


def build_ppl_prompt_text(item: dict) -> str:
    from medpipe.stages.evaluation.prompts import build_ppl_prompt

    return build_ppl_prompt(item)[0]


if __name__ == "__main__":
    main()
