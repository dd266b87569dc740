"""Train/eval overlap check: an eval set must never overlap train.

Exact: normalised question/text (``dedup.question_key``: the mcq question, the user turns of a
chat, the text) of an eval record equals a train record's. Near: MinHash LSH (datasketch) over
the same keys, Jaccard ≥ threshold (0.8) on character 5-gram shingles.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .dedup import NEAR_THRESHOLD, NUM_PERM, key_hash, lsh_for, minhash_bulk, question_key


@dataclass
class OverlapReport:
    n_train: int
    n_eval: int
    exact: list = field(default_factory=list)   # (eval _loc, train _loc)
    near: list = field(default_factory=list)    # (eval _loc, train _loc, jaccard estimate)

    @property
    def ok(self) -> bool:
        return not self.exact and not self.near

    @property
    def n_overlap(self) -> int:
        return len({e for e, *_ in self.exact} | {e for e, *_ in self.near})

    def summary(self) -> str:
        s = (f"eval/train overlap: {len(self.exact)} exact, {len(self.near)} near "
             f"({self.n_overlap}/{self.n_eval} eval records)")
        for e, t, *j in (self.exact + self.near)[:5]:
            s += f"\n  {e} ~ {t}" + (f" (J≈{j[0]:.2f})" if j else "")
        return s

    def to_dict(self) -> dict:
        return {"n_train": self.n_train, "n_eval": self.n_eval, "exact": len(self.exact),
                "near": len(self.near), "ok": self.ok, "examples": (self.exact + self.near)[:20]}

    def raise_if_overlap(self):
        if not self.ok:
            from .errors import DataError
            raise DataError(self.summary(), None, None, None, reason="eval_overlap")


def _loc(r, i, side):
    return r.get("_loc") or f"{side}[{i}]"


def check_overlap(train_records, eval_records, *, near: bool = True,
                  threshold: float = NEAR_THRESHOLD, num_perm: int = NUM_PERM) -> OverlapReport:
    rep = OverlapReport(n_train=len(train_records), n_eval=len(eval_records))
    tkeys = [question_key(r) for r in train_records]
    ekeys = [question_key(r) for r in eval_records]
    index = {}
    for i, k in enumerate(tkeys):
        index.setdefault(key_hash(k), i)
    exact_eval = set()
    for j, k in enumerate(ekeys):
        i = index.get(key_hash(k))
        if i is not None:
            rep.exact.append((_loc(eval_records[j], j, "eval"), _loc(train_records[i], i, "train")))
            exact_eval.add(j)
    if near and tkeys and ekeys:
        lsh = lsh_for(threshold, num_perm)
        tm = minhash_bulk(tkeys, num_perm=num_perm)
        for i, m in enumerate(tm):
            lsh.insert(i, m, check_duplication=False)
        rest = [j for j in range(len(ekeys)) if j not in exact_eval]
        em = minhash_bulk([ekeys[j] for j in rest], num_perm=num_perm)
        for j, m in zip(rest, em):
            best = None
            for i in lsh.query(m):
                jac = m.jaccard(tm[i])
                if jac >= threshold and (best is None or jac > best[1]):
                    best = (i, jac)
            if best is not None:
                i, jac = best
                rep.near.append((_loc(eval_records[j], j, "eval"),
                                 _loc(train_records[i], i, "train"), round(jac, 3)))
    return rep
