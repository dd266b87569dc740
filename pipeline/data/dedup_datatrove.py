"""Near-dedup beyond one machine on datatrove's MinHash pipeline (Local / Slurm / Ray executors),
deciding exactly as the single-machine path (``medpipe.data.dedup.clusters``) does.

Why this split of work (and not datatrove's MinhashConfig semantics on both sides): the
single-machine path's decision is "two texts share one LSH band of their datasketch MinHash
(char 5-grams of the normalised key, 128 perms, banding of ``lsh_for``) AND the MinHash Jaccard
estimate >= threshold", clusters = connected components, the smallest index kept. Datatrove
out of the box shingles *words* (Chinese has none: 20% recall), hashes with xxhash (broken
with xxhash 4.x) and decides by band collision alone, keeping the union-by-size root. So:

* datatrove does what needs a cluster: per-task signatures (stage 1), the sort/merge of every
  band across all tasks (stage 2, ``num_buckets`` tasks or a multiple);
* the signature step is ``MedpipeSignature``: its "bands" are the datasketch signature's bands
  (b x r of ``lsh_for``), so datatrove's bucket stage finds exactly the pairs datasketch's
  MinHashLSH finds; beside them it writes each doc's key hash + full signature (side file);
* ``ConfirmClusters`` (stage 3, one task, like datatrove's own cluster stage) turns each band's
  equal-signature group back into all its pairs, merges exact duplicates, confirms the rest
  with the same estimate >= threshold, unions with the smallest index as root and writes
  ``removed.tsv`` (global index, kept index) + ``<rank>.remove`` (datatrove's filter format).

Same edge set, so the same clusters and keep list for any input, not only on a fixture
(tests/test_dedup_datatrove.py). Torch-free; datatrove is imported lazily.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from .dedup import NEAR_THRESHOLD, NUM_PERM, lsh_for, normalise

KEY_BYTES = 16
SENTINEL = (1 << 32) - 1


def bands(threshold: float = NEAR_THRESHOLD, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(b, r) of the single-machine MinHashLSH: datatrove's num_buckets / hashes_per_bucket."""
    lsh = lsh_for(threshold, num_perm)
    return lsh.b, lsh.r


def minhash_config(threshold: float = NEAR_THRESHOLD, num_perm: int = NUM_PERM):
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.utils.hashing import HashConfig
    b, r = bands(threshold, num_perm)
    # hash_fc is never called (our get_shingles); sha1 because datatrove's xxhash path breaks on xxhash 4.x
    return MinhashConfig(n_grams=5, num_buckets=b, hashes_per_bucket=r,
                         hash_config=HashConfig(precision=64, hash_fc="sha1"))


def write_inputs(texts, folder: str | Path, tasks: int) -> list[int]:
    """Texts as ``tasks`` contiguous JSONL shards ``<rank>.jsonl`` + manifest.json (shard sizes):
    doc d of shard r is global index offsets[r] + d."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    texts = list(texts)
    n = len(texts)
    sizes = [n // tasks + (1 if r < n % tasks else 0) for r in range(tasks)]
    i = 0
    for r, k in enumerate(sizes):
        with open(folder / f"{r:05d}.jsonl", "w", encoding="utf-8") as f:
            for t in texts[i:i + k]:
                f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
        i += k
    (folder / "manifest.json").write_text(json.dumps({"sizes": sizes}))
    return sizes


def _steps():
    """The datatrove step classes, defined on first use so importing this module needs no datatrove."""
    g = globals()
    if "ShardReader" in g:
        return g["ShardReader"], g["MedpipeSignature"], g["ConfirmClusters"]
    import numpy as np
    from datatrove.data import Document
    from datatrove.io import get_datafolder
    from datatrove.pipeline.base import PipelineStep
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature
    from datatrove.utils.word_tokenizers import WordTokenizer

    class _Unused(WordTokenizer):   # datatrove wants one; our get_shingles does not tokenise words
        def word_tokenize(self, text): return list(text)
        def sent_tokenize(self, text): return [text]
        def span_tokenize(self, text): return [(0, len(text))]

    class ShardReader(PipelineStep):
        """Rank r reads <rank>.jsonl (stdlib json: datatrove's JsonlReader needs orjson)."""
        name, type = "medpipe shards", "📖 - READER"

        def __init__(self, folder):
            super().__init__()
            self.folder = get_datafolder(folder)

        def run(self, data=None, rank: int = 0, world_size: int = 1):
            with self.folder.open(f"{rank:05d}.jsonl", "rt", encoding="utf-8") as f:
                for d, line in enumerate(f):
                    yield Document(text=json.loads(line)["text"], id=f"{rank}/{d}")

    class MedpipeSignature(MinhashDedupSignature):
        """The single-machine signature (dedup._chunk_signatures of the normalised key), its first
        b*r values cut into datatrove buckets; key hash + whole signature to side/<rank>.bin."""
        name = "🎯 medpipe MinHash signatures"

        def __init__(self, output_folder, threshold=NEAR_THRESHOLD, num_perm=NUM_PERM):
            super().__init__(output_folder, config=minhash_config(threshold, num_perm), language=_Unused())
            self.num_perm = num_perm
            self._side = None

        def get_shingles(self, text):
            import hashlib
            from .dedup import _chunk_signatures
            norm = normalise(text)
            sig = _chunk_signatures([norm], self.num_perm)[0]
            self._side.write(hashlib.blake2b(norm.encode("utf-8"), digest_size=KEY_BYTES).digest()
                             + sig.astype("<u4").tobytes())    # datasketch values are < 2**32
            return sig

        def get_signature(self, sig):
            r = self.config.hashes_per_bucket
            return [sig[i * r:(i + 1) * r].tolist() for i in range(self.config.num_buckets)]

        def run(self, data, rank: int = 0, world_size: int = 1):
            with self.output_folder.open(f"side/{rank:05d}.bin", mode="wb") as self._side:
                super().run(data, rank, world_size)

    class ConfirmClusters(PipelineStep):
        name, type = "🎯 medpipe confirm + cluster", "🫂 - DEDUP"

        def __init__(self, buckets, signatures, inputs, output, threshold=NEAR_THRESHOLD, num_perm=NUM_PERM):
            super().__init__()
            self.buckets, self.sigs = get_datafolder(buckets), get_datafolder(signatures)
            self.inputs, self.output = get_datafolder(inputs), get_datafolder(output)
            self.threshold, self.num_perm = threshold, num_perm

        def groups(self):
            """Each .dups file is one band's sorted stream: consecutive equal signatures come as a
            chain (a,b), (b,c), ... — a chain is one group of docs sharing that band."""
            for name in self.buckets.list_files(glob_pattern="*.dups"):
                with self.buckets.open(name, "rb") as f:
                    raw = f.read()
                group: list = []
                for f1, d1, f2, d2 in struct.iter_unpack("<4I", raw):
                    if group and group[-1] == (f1, d1):
                        group.append((f2, d2))
                    else:
                        if group:
                            yield group
                        group = [(f1, d1), (f2, d2)]
                if group:
                    yield group

        def run(self, data=None, rank: int = 0, world_size: int = 1):
            assert world_size == 1, "one task: the union-find holds every confirmed pair"
            with self.inputs.open("manifest.json", "rt") as f:
                sizes = json.load(f)["sizes"]
            offsets = [sum(sizes[:r]) for r in range(len(sizes))]
            row = KEY_BYTES + 4 * self.num_perm
            cache: dict = {}

            def load(node):
                if node not in cache:
                    fi, d = node
                    with self.sigs.open(f"side/{fi:05d}.bin", "rb") as f:
                        f.seek(d * row)
                        b = f.read(row)
                    cache[node] = (b[:KEY_BYTES], np.frombuffer(b[KEY_BYTES:], dtype="<u4"))
                return cache[node]

            parent: dict[int, int] = {}

            def find(x):
                while parent.get(x, x) != x:
                    parent[x] = parent.get(parent[x], parent[x])
                    x = parent[x]
                return x

            def union(a, b):
                ra, rb = find(a), find(b)
                if ra != rb:   # the smallest index is the root, as in dedup._UF
                    parent[max(ra, rb)] = min(ra, rb)

            need = int(np.ceil(self.threshold * self.num_perm - 1e-9))   # est >= t <=> equal values >= need
            for group in self.groups():
                if any(fi == SENTINEL for fi, _ in group):
                    continue
                reps: dict[bytes, int] = {}
                rep_sigs = []
                for node in sorted(group):
                    g = offsets[node[0]] + node[1]
                    key, sig = load(node)
                    if key in reps:
                        union(reps[key], g)          # exact duplicate of the normalised key
                    else:
                        reps[key] = g
                        rep_sigs.append(sig)
                idx = list(reps.values())
                if len(idx) > 1:
                    S = np.stack(rep_sigs)
                    for a in range(len(idx) - 1):
                        same = (S[a + 1:] == S[a]).sum(axis=1)
                        for k in np.nonzero(same >= need)[0]:
                            union(idx[a], idx[a + 1 + int(k)])
                if len(cache) > 500_000:
                    cache.clear()
            removed = sorted((g, find(g)) for g in parent if find(g) != g)
            with self.output.open("removed.tsv", "wt") as f:
                f.writelines(f"{g}\t{root}\n" for g, root in removed)
            per_rank: dict[int, list[int]] = {}
            for g, _ in removed:
                r = max(i for i, o in enumerate(offsets) if o <= g and sizes[i])
                per_rank.setdefault(r, []).append(g - offsets[r])
            for r, docs in per_rank.items():    # datatrove's MinhashDedupFilter reads these
                with self.output.open(f"{r:06d}.remove", "wb") as f:
                    f.write(b"".join(struct.pack("<I", d) for d in sorted(docs)))

    for cls in (ShardReader, MedpipeSignature, ConfirmClusters):
        cls.__qualname__ = cls.__name__     # pickled by reference (Slurm/Ray, local workers)
    globals().update(ShardReader=ShardReader, MedpipeSignature=MedpipeSignature,
                     ConfirmClusters=ConfirmClusters)
    return ShardReader, MedpipeSignature, ConfirmClusters


def __getattr__(name):   # module attribute on first use: unpickling a step in a worker finds its class
    if name in ("ShardReader", "MedpipeSignature", "ConfirmClusters"):
        return dict(zip(("ShardReader", "MedpipeSignature", "ConfirmClusters"), _steps()))[name]
    raise AttributeError(name)


def pipelines(inputs: str, work: str, threshold: float = NEAR_THRESHOLD, num_perm: int = NUM_PERM):
    """The three stages' step lists (paths may be s3://... or a shared filesystem for a cluster)."""
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets
    reader, signature, confirm = _steps()
    cfg = minhash_config(threshold, num_perm)
    return (
        [reader(inputs), signature(f"{work}/signatures", threshold, num_perm)],
        [MinhashDedupBuckets(input_folder=f"{work}/signatures", output_folder=f"{work}/buckets", config=cfg)],
        [confirm(f"{work}/buckets", f"{work}/signatures", inputs, f"{work}/clusters", threshold, num_perm)],
    )


def executors(kind: str, inputs: str, work: str, tasks: int, threshold: float = NEAR_THRESHOLD,
              num_perm: int = NUM_PERM, **kw):
    """The chain of three executors (the last one's run() runs or submits all three).
    kind: local | slurm (kw: partition, time, venv_path, sbatch_args, ...) | ray (kw: cpus_per_task, ...)."""
    s1, s2, s3 = pipelines(inputs, work, threshold, num_perm)
    nb = bands(threshold, num_perm)[0]
    if kind == "local":
        from datatrove.executor import LocalPipelineExecutor as E
        common = dict(skip_completed=False)
        extra = [{"workers": tasks}, {"workers": min(tasks, nb)}, {}]
    elif kind == "slurm":
        from datatrove.executor import SlurmPipelineExecutor as E
        common = dict(kw)
        common.setdefault("time", "04:00:00")
        extra = [{"job_name": "mp_dedup_sigs"}, {"job_name": "mp_dedup_buckets"},
                 {"job_name": "mp_dedup_confirm", "mem_per_cpu_gb": 16}]
    elif kind == "ray":
        from datatrove.executor import RayPipelineExecutor as E
        common = dict(kw)
        extra = [{}, {}, {"mem_per_cpu_gb": 16}]
    else:
        raise ValueError(f"executor {kind!r}: local | slurm | ray")
    e1 = E(s1, tasks=tasks, logging_dir=f"{work}/logs/1_signatures", **extra[0], **common)
    e2 = E(s2, tasks=nb, logging_dir=f"{work}/logs/2_buckets", depends=e1, **extra[1], **common)
    e3 = E(s3, tasks=1, logging_dir=f"{work}/logs/3_confirm", depends=e2, **extra[2], **common)
    return e1, e2, e3


def read_clusters(work: str | Path, n: int) -> list[int]:
    """Cluster id per global index (the kept index of its cluster), as dedup.clusters returns."""
    out = list(range(n))
    p = Path(work) / "clusters" / "removed.tsv"
    for line in p.read_text().splitlines():
        g, root = line.split("\t")
        out[int(g)] = int(root)
    return out


def clusters(texts, work: str | Path, tasks: int = 2, threshold: float = NEAR_THRESHOLD,
             num_perm: int = NUM_PERM) -> list[int]:
    """dedup.clusters(texts) computed by datatrove's LocalPipelineExecutor with ``tasks`` tasks."""
    import shutil
    work = Path(work)
    shutil.rmtree(work, ignore_errors=True)    # completions/ of an older run would skip stages
    texts = list(texts)
    write_inputs(texts, work / "input", tasks)
    *_, last = executors("local", str(work / "input"), str(work), tasks, threshold, num_perm)
    last.run()
    return read_clusters(work, len(texts))


def keep_indices(cluster_ids: list[int]) -> list[int]:
    return [i for i, c in enumerate(cluster_ids) if c == i]
