"""Weighted mixing of sources, deterministic under a seed.

``weight`` is the sampling proportion of a source in the mixed set. With sizes ``n_i`` and
weights ``w_i``, the mixed set has ``N = sum(n_i)`` records (the size of plain concatenation)
and source *i* contributes ``round(N * w_i / sum(w))`` records (largest-remainder rounding so
the counts add up to N):

* fewer than it has → a seeded random subset (without repetition);
* more than it has  → upsampling with repetition: every record ``k // n_i`` times, plus a
  seeded random subset for the remainder (no record appears more than once more than another).

When no source sets a weight (None everywhere) the sources are simply concatenated (natural
proportions); once any source sets one, unset weights count as 1.0 and proportions apply, so
`weight: 1` on two sources means 1 : 1 whatever their sizes. A weight of 0 drops the source from the mix (it is still validated).
The result is shuffled with the same seed.
"""
from __future__ import annotations

import math
import random


def mix_counts(sizes: list[int], weights: list[float]) -> list[int]:
    if not sizes:
        return []
    if all(w is None for w in weights):
        return list(sizes)
    weights = [1.0 if w is None else w for w in weights]
    total_w = sum(weights)
    N = sum(sizes)
    if total_w <= 0:
        return [0] * len(sizes)
    exact = [N * w / total_w for w in weights]
    counts = [math.floor(x) for x in exact]
    rest = N - sum(counts)
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:rest]:
        counts[i] += 1
    return counts


def sample(records: list, k: int, rng: random.Random) -> list:
    n = len(records)
    if k <= 0 or n == 0:
        return []
    reps, rem = divmod(k, n)
    out = list(records) * reps
    if rem:
        out += rng.sample(records, rem)
    return out


def mix_sources(parts: list[list], weights: list[float], seed: int = 0,
                shuffle: bool = True) -> tuple[list, list[int]]:
    """Mix ``parts`` (one list of records per source) → (mixed list, count per source)."""
    rng = random.Random(seed)
    counts = mix_counts([len(p) for p in parts], weights)
    out: list = []
    for p, k in zip(parts, counts):
        if k == len(p):
            out.extend(p)
        else:
            out.extend(sample(p, k, rng))
    if shuffle:
        rng.shuffle(out)
    return out, counts
