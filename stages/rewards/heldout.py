"""Held-out rollouts scored before and after RL: one sampled completion per held-out prompt
(the stage's temperature, the same sampling seed both times, so the two passes differ only by
the weights), scored by the stage's rewards. Reports the mean total reward, each reward's mean,
the format-valid rate, exact-match accuracy (the eval stage's letter extraction) and the mean
completion length in tokens."""
from __future__ import annotations

from typing import Any, Callable, Sequence

from .answers import completion_text, format_problem, parse_answer


def sample(model: Any, tok: Any, prompts: Sequence[Any], *, max_new_tokens: int, temperature: float, seed: int,
           batch_size: int = 8) -> list[tuple[str, int]]:
    """(text, completion tokens) per prompt: sampled at `temperature` (greedy at 0), left padded,
    generators seeded with `seed` before every batch (so a batch's samples do not depend on the
    batches before it)."""
    import torch

    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if isinstance(p, list) else p
             for p in prompts]
    side, tok.padding_side = tok.padding_side, "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out: list[tuple[str, int]] = []
    if torch.cuda.is_available() and next(model.parameters()).device.type == "cpu":
        model.to("cuda")  # the pass before training runs before the trainer places the model
    was_training = model.training
    model.eval()
    try:
        for b in range(0, len(texts), batch_size):
            enc = tok(texts[b:b + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
            torch.manual_seed(seed + b)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                     temperature=temperature if temperature > 0 else None, top_p=1.0, top_k=0,
                                     pad_token_id=pad)
            for row in gen[:, enc["input_ids"].shape[1]:].tolist():
                ids = [t for t in row if t != pad]
                if tok.eos_token_id in ids:
                    ids = ids[:ids.index(tok.eos_token_id)]
                out.append((tok.decode(ids, skip_special_tokens=True), len(ids)))
    finally:
        tok.padding_side = side
        model.train(was_training)
    return out


def score(rows: Sequence[dict], samples: Sequence[tuple[str, int]], rewards: Sequence[Callable],
          weights: Sequence[float], think: bool = False) -> dict:
    """Metrics of one held-out pass (rows: the stage's dataset rows: prompt, answer, letters)."""
    prompts = [r["prompt"] for r in rows]
    completions = [s[0] for s in samples]
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"} if rows else {}
    ids = [[0] * s[1] for s in samples]
    total = [0.0] * len(rows)
    out: dict = {"n": len(rows)}
    for fn, w in zip(rewards, weights):
        vals = fn(prompts=prompts, completions=completions, completion_ids=ids, **columns)
        got = [v for v in vals if v is not None]
        out[f"reward_{fn.__name__}"] = sum(got) / len(got) if got else float("nan")
        total = [t + w * (v or 0.0) for t, v in zip(total, vals)]
    out["reward"] = sum(total) / len(total) if total else float("nan")
    valid = [format_problem(completion_text(c), r["letters"], think) is None for c, r in zip(completions, rows)]
    correct = [r["answer"] and (parse_answer(completion_text(c), r["letters"])[0] or None) == sorted(r["answer"])
               for c, r in zip(completions, rows)]
    out["format_valid"] = sum(valid) / max(1, len(valid))
    out["accuracy"] = sum(bool(c) for c in correct) / max(1, len(correct))
    out["completion_tokens"] = sum(s[1] for s in samples) / max(1, len(samples))
    return out
