"""`medpipe dedup DATA`: exact + MinHash near-dedup of a data spec, on one machine
(medpipe.data.dedup) or on datatrove's pipeline (medpipe.data.dedup_datatrove: local tasks, or
Slurm / Ray for corpora beyond one machine); both keep the same records. Writes the keep list:
one `file:line` of a kept record per line."""
from __future__ import annotations

import time
from pathlib import Path

CLUSTER_CODE = """\
# the same dedup on a cluster (every path on storage all nodes see: shared FS or s3://):
from medpipe.data import dedup_datatrove as dd
dd.write_inputs(keys, "{work}/input", tasks={tasks})          # keys: medpipe.data.dedup.record_key(r)
*_, last = dd.executors({kind!r}, "{work}/input", "{work}", tasks={tasks}, {kw})
last.run()                                                   # {what}
cluster_ids = dd.read_clusters("{work}", len(keys))          # == medpipe.data.dedup.clusters(keys)
"""


def cluster_snippet(kind: str, work: str, tasks: int, kw: dict) -> str:
    what = ("sbatch-es 3 array jobs chained afterok" if kind == "slurm"
            else "runs the chain on the Ray cluster (ray.init(address=...) first)")
    kwtext = ", ".join(f"{k}={v!r}" for k, v in kw.items())
    return CLUSTER_CODE.format(work=work, tasks=tasks, kind=kind, kw=kwtext, what=what)


def run_dedup(data: str, want: str, engine: str, executor: str, tasks: int, work: str,
              keep_file: str | None, threshold: float, submit: bool, cluster_kw: dict, echo) -> list[str]:
    from medpipe.data import load_records
    from medpipe.data import dedup as single
    from medpipe.data.dedup import record_key

    res = load_records(data, want)
    records = sorted(res.records, key=lambda r: _loc_order(r["_loc"]))   # file order, not the mix's shuffle
    keys = [record_key(r) for r in records]
    t0 = time.time()
    if engine == "single":
        ids = single.clusters(keys, threshold=threshold)
    else:
        from medpipe.data import dedup_datatrove as dd
        if executor != "local":
            echo(cluster_snippet(executor, work, tasks, cluster_kw))
            if not submit:
                echo("(printed only; --submit runs it from here)")
                return []
            dd.write_inputs(keys, f"{work}/input", tasks)
            *_, last = dd.executors(executor, f"{work}/input", work, tasks, threshold, **cluster_kw)
            last.run()
            if executor == "slurm":
                echo(f"submitted; afterwards: medpipe dedup ... reads {work}/clusters/removed.tsv")
                return []
            ids = dd.read_clusters(work, len(keys))
        else:
            ids = dd.clusters(keys, work, tasks=tasks, threshold=threshold)
    kept = [records[i]["_loc"] for i, c in enumerate(ids) if c == i]
    echo(f"{len(records)} records, {len(records) - len(kept)} duplicates (exact + near >= {threshold}), "
         f"{len(kept)} kept; {engine}{'/' + executor if engine != 'single' else ''} in {time.time() - t0:.1f} s")
    if keep_file:
        Path(keep_file).write_text("".join(f"{loc}\n" for loc in kept), encoding="utf-8")
        echo(f"keep list: {keep_file}")
    return kept


def _loc_order(loc: str):
    path, _, line = loc.rpartition(":")
    return (path, int(line)) if line.isdigit() else (loc, 0)
