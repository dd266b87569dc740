"""Exact and near-duplicate detection.

* exact: hash of the normalised key (NFKC, lower case, punctuation and whitespace removed).
* near: MinHash LSH from ``datasketch`` (maintained library, not hand-written): character
  5-gram shingles of the normalised key, 128 permutations, Jaccard threshold 0.8 by default.
  Clusters are the connected components of "LSH says similar" pairs (union-find), so
  duplicates of duplicates land in one cluster.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata

_NONWORD = re.compile(r"[\W_]+", re.UNICODE)

NEAR_THRESHOLD = 0.8
NUM_PERM = 128
SHINGLE = 5


def normalise(s: str) -> str:
    return _NONWORD.sub("", unicodedata.normalize("NFKC", s).lower())


def key_hash(s: str) -> bytes:
    return hashlib.blake2b(normalise(s).encode("utf-8"), digest_size=16).digest()


def record_key(rec: dict) -> str:
    """The text that identifies a record for duplicates / heldout clusters / eval overlap:
    text → text; chat → system+user turns; preference → prompt turns;
    mcq → context + question + option texts (generic stems like "which is correct?" differ by
    their options)."""
    if "text" in rec:
        return rec["text"]
    if "messages" in rec:
        return "\n".join(m["content"] for m in rec["messages"] if m["role"] != "assistant")
    if "prompt" in rec:
        return "\n".join(m["content"] for m in rec["prompt"])
    if "options" in rec:
        return "\n".join([rec.get("context") or "", rec["question"],
                          *sorted(rec["options"].values())])
    raise KeyError("record has no text/messages/prompt/options")


def question_key(rec: dict) -> str:
    """Looser key for train/eval overlap: the question itself (mcq), the user turns (chat)."""
    if "options" in rec:
        return rec["question"]
    return record_key(rec)


def shingles(norm: str, k: int = SHINGLE) -> list[bytes]:
    if len(norm) <= k:
        return [norm.encode("utf-8")]
    return list({norm[i:i + k].encode("utf-8") for i in range(len(norm) - k + 1)})


def minhashes(texts, num_perm: int = NUM_PERM, seed: int = 1):
    from datasketch import LeanMinHash, MinHash
    sets = [shingles(normalise(t)) for t in texts]
    return [LeanMinHash(m) for m in MinHash.bulk(sets, num_perm=num_perm, seed=seed)]


class _UF:
    def __init__(self, n):
        self.p = list(range(n))

    def find(self, x):
        p = self.p
        while p[x] != x:
            p[x] = p[p[x]]
            x = p[x]
        return x

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                self.p[rb] = ra
            else:
                self.p[ra] = rb


def clusters(texts: list[str], near: bool = True, threshold: float = NEAR_THRESHOLD,
             num_perm: int = NUM_PERM) -> list[int]:
    """Cluster id per text (the smallest index in its cluster): exact normalised matches, plus
    MinHash-LSH near duplicates when ``near``."""
    n = len(texts)
    uf = _UF(n)
    first: dict[bytes, int] = {}
    norms = [normalise(t) for t in texts]
    for i, s in enumerate(norms):
        h = hashlib.blake2b(s.encode("utf-8"), digest_size=16).digest()
        j = first.setdefault(h, i)
        if j != i:
            uf.union(j, i)
    if near and n > 1:
        from datasketch import MinHash, MinHashLSH
        reps = [i for i in range(n) if uf.find(i) == i]
        sets = [shingles(norms[i]) for i in reps]
        mhs = MinHash.bulk(sets, num_perm=num_perm)
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        by_idx = {}
        for i, m in zip(reps, mhs):
            for j in lsh.query(m):
                # LSH gives candidates; confirm with the MinHash Jaccard estimate
                if m.jaccard(by_idx[j]) >= threshold:
                    uf.union(i, j)
            lsh.insert(i, m, check_duplication=False)
            by_idx[i] = m
    return [uf.find(i) for i in range(n)]
