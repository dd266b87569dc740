"""Weighted mixing, exact + near dedup, held-out splits by duplicate cluster, eval overlap."""
import json
import random
from collections import Counter

import pytest

from medpipe.data import DataError, check_overlap, load_records
from medpipe.data.dedup import clusters
from medpipe.data.mix import mix_counts


def write_texts(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    return str(path)


def docs(n, tag, seed=0, words=60):
    """Distinct documents of ~60 random pseudo-words (high-entropy, so unrelated docs share
    almost no 5-gram shingles)."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 8)))
             for _ in range(2000)] + ["fever"]
    return [f"{tag} {i} fever " + " ".join(rng.choice(vocab) for _ in range(words))
            for i in range(n)]


def test_mix_counts_rules():
    assert mix_counts([100, 10], [None, None]) == [100, 10]         # no weights: concat
    assert mix_counts([100, 10], [1.0, 1.0]) == [55, 55]            # explicit 1 : 1 of N=110
    assert mix_counts([100, 10], [1.0, None]) == [55, 55]           # unset counts as 1 once any is set
    assert mix_counts([30, 30, 30], [0.5, 0.3, 0.2]) == [45, 27, 18]
    assert sum(mix_counts([7, 5, 3], [1, 2, 4])) == 15


def test_mixing_proportional_and_deterministic(tmp_path):
    a = write_texts(tmp_path / "a.jsonl", docs(200, "A"))
    b = write_texts(tmp_path / "b.jsonl", docs(20, "B", 1))
    spec = [{"path": a, "weight": 0.75}, {"path": b, "weight": 0.25}]
    r1 = load_records(spec, "text", seed=7)
    r2 = load_records(spec, "text", seed=7)
    r3 = load_records(spec, "text", seed=8)
    assert [x["text"] for x in r1.records] == [x["text"] for x in r2.records]
    assert [x["text"] for x in r1.records] != [x["text"] for x in r3.records]
    c = Counter(x["text"][0] for x in r1.records)
    assert c == {"A": 165, "B": 55}                 # 220 * 0.75 / 0.25
    # B is upsampled with repetition: every doc appears 2 or 3 times
    reps = Counter(x["text"] for x in r1.records if x["text"][0] == "B")
    assert set(reps.values()) <= {2, 3} and len(reps) == 20
    assert [r.mixed for r in r1.reports] == [165, 55]


def test_exact_and_near_dedup(tmp_path):
    base = docs(50, "doc")
    near = [t.replace("fever", "pyrexia", 1) for t in base[:10]]
    exact = [t.upper() + "!" for t in base[10:15]]       # same after normalisation
    p = write_texts(tmp_path / "c.jsonl", base + near + exact)
    none = load_records(p, "text")
    assert len(none.records) == 65 and none.reports[0].duplicates == 5
    ex = load_records({"path": p, "dedup": "exact"}, "text")
    assert len(ex.records) == 60 and ex.reports[0].dropped_by_reason == {"duplicate": 5}
    nr = load_records({"path": p, "dedup": "near"}, "text")
    assert len(nr.records) == 50
    assert nr.reports[0].dropped_by_reason == {"duplicate": 5, "near_duplicate": 10}
    assert {x["text"] for x in nr.records} == set(base)     # the first occurrence is kept


def test_dedup_across_sources(tmp_path):
    a = write_texts(tmp_path / "a.jsonl", docs(20, "A"))
    b = write_texts(tmp_path / "b.jsonl", docs(20, "A")[:5] + docs(5, "B", 3))
    r = load_records([a, {"path": b, "dedup": "exact"}], "text")
    assert [x.kept for x in r.reports] == [20, 5] and r.reports[1].duplicates == 5


def test_clusters_union_chains():
    t = ["alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu",
         "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu",
         "completely different text about renal failure and dialysis"]
    c = clusters(t)
    assert c[0] == c[1] != c[2]


def test_heldout_never_shares_a_cluster_with_train(tmp_path):
    base = docs(300, "q", 5)
    dup = [t + " ." for t in base[:60]] + [t.replace(" ", "  ") for t in base[60:90]]
    p = write_texts(tmp_path / "h.jsonl", base + dup)
    r = load_records({"path": p, "heldout": 0.2}, "text", seed=3)
    assert r.heldout and r.reports[0].heldout == len(r.heldout)
    assert len(r.heldout) == heldout_count(0.2, seed=3)
    all_recs = r.records + r.heldout
    cl = clusters([x["text"] for x in all_recs])
    train_c = {cl[i] for i in range(len(r.records))}
    held_c = {cl[i] for i in range(len(r.records), len(all_recs))}
    assert not train_c & held_c
    assert check_overlap(r.records, r.heldout).ok
    # deterministic
    r2 = load_records({"path": p, "heldout": 0.2}, "text", seed=3)
    assert [x["_loc"] for x in r2.heldout] == [x["_loc"] for x in r.heldout]
    # load_records(heldout=) is the default for sources without their own
    r3 = load_records(p, "text", heldout=0.1)
    assert len(r3.heldout) == heldout_count(0.1, seed=0)  # load_records' default seed


def heldout_count(fraction: float, seed: int) -> int:
    """How many of test_heldout_never_shares_a_cluster_with_train's 390 records are held out: its
    300 documents are 300 clusters (ids 0-299, the first member's index), the first 90 with a
    near copy; the clusters are drawn in the seed's shuffled order, each whole, while fewer than
    round(390 × fraction) records are held out (so a last pair may overshoot by one)."""
    order = list(range(300))
    random.Random(seed).shuffle(order)
    want, held = round(390 * fraction), 0
    for c in order:
        if held < want:
            held += 2 if c < 90 else 1
    return held


def test_check_overlap_exact_and_near(tmp_path):
    train = [{"text": t, "_loc": f"t:{i}"} for i, t in enumerate(docs(100, "tr"))]
    ev = [{"text": train[3]["text"].upper(), "_loc": "e:1"},          # exact after normalising
          {"text": train[7]["text"] + " extra", "_loc": "e:2"},       # near
          {"text": "an unrelated question about gout", "_loc": "e:3"}]
    rep = check_overlap(train, ev)
    assert not rep.ok and rep.exact == [("e:1", "t:3")]
    assert [(e, t) for e, t, _ in rep.near] == [("e:2", "t:7")]
    assert rep.n_overlap == 2 and "2/3" in rep.summary()
    with pytest.raises(DataError, match="overlap"):
        rep.raise_if_overlap()
    assert check_overlap(train, ev[2:]).ok


def test_check_overlap_mcq_by_question():
    tr = [{"id": "1", "question": "Which drug is first-line for absence seizures?",
           "options": {"A": "Ethosuximide", "B": "Phenytoin"}, "answer": ["A"]}]
    ev = [{"id": "9", "question": "which drug is first line for absence seizures",
           "options": {"A": "Valproate", "B": "Ethosuximide"}, "answer": ["B"]}]
    assert len(check_overlap(tr, ev).exact) == 1


def test_near_dedup_in_parallel_keeps_the_same_documents(monkeypatch):
    """Signatures computed in worker processes give the same clusters as in one process, and the
    planted near-duplicates (1% of characters edited) land with their originals."""
    import random

    from medpipe.data import dedup

    rng = random.Random(3)
    words = "患者 发热 咳嗽 高血压 糖尿病 治疗 诊断 patient fever insulin aspirin renal cardiac".split()
    docs = ["".join(rng.choice(words) for _ in range(rng.randint(60, 120))) + str(i) for i in range(400)]
    planted = {}
    for k in range(40):
        src = rng.randrange(400)
        chars = list(docs[src])
        for j in rng.sample(range(len(chars)), max(1, len(chars) // 100)):
            chars[j] = "的"
        planted[len(docs)] = src
        docs.append("".join(chars))
    monkeypatch.setattr(dedup, "PARALLEL_MIN", 100)
    monkeypatch.setattr(dedup, "CHUNK", 64)
    serial = dedup.clusters(docs, near=True, workers=1)
    parallel = dedup.clusters(docs, near=True, workers=2)
    assert parallel == serial
    assert all(serial[i] == serial[src] for i, src in planted.items())
    assert len(set(serial)) == 400
