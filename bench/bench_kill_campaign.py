"""Kill -9 campaign (issue 18): SIGKILL `medpipe run` at points inside every stage kind of qilin
(cpt, sft, dpo, eval) and medcare (medcare_mka, medcare_da) — while training, while a checkpoint
is written, after one, while the final model is saved, mid-merge, before the artifact, mid-eval —
then rerun the same command and check that every stage ends with the same content digest
(artifact.json's digest of the files it hands on) and trainable-weights sha256 as an
uninterrupted run.

The campaign runs a snapshot of the repository's HEAD (`git archive` into OUT/code, imported
through PYTHONPATH ahead of the editable install), so edits to the shared working tree during
the campaign cannot change the code, the tiny model or the data under it. One store for the
whole campaign: the uninterrupted reference runs first; each kill point reruns
its stage with `--from STAGE` (the reference entry is kept aside), is killed when its trigger
fires (polled every 2 ms on the stage's store entry), and is then rerun without flags, which
resumes the stage from its newest loadable checkpoint and reuses or retrains what follows by the
content its upstream handed on. A trigger that never fired (the stage finished first) is reported
as "missed", not counted.

    /work/main/.venv/bin/python bench/bench_kill_campaign.py [--out /tmp/kill] [--only qilin]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RECIPES = {
    "qilin": ["recipe=qilin", "~stages.cmexam_cpt", "~stages.ceval_cpt", "~stages.cmexam_sft", "~stages.ceval_sft",
              "stages.cpt.max_steps=8", "stages.cpt.save_steps=3", "stages.cpt.logging_steps=1",
              "stages.sft.max_steps=8", "stages.sft.save_steps=3", "stages.sft.logging_steps=1",
              "stages.dpo.max_steps=6", "stages.dpo.save_steps=2", "stages.dpo.logging_steps=1",
              "stages.dpo.reward_eval_pairs=8", "stages.eval.limit=12"],
    "medcare": ["recipe=medcare", "stages.mka.max_steps=8", "stages.mka.save_steps=3", "stages.mka.logging_steps=1",
                "stages.da.max_steps=8", "stages.da.save_steps=3", "stages.da.logging_steps=1"],
}


def _lines(p: Path) -> int:
    try:
        return len(p.read_text().splitlines())
    except OSError:
        return 0


def _ckpts(sdir: Path) -> list[Path]:
    d = sdir / "checkpoints"
    return sorted(d.glob("checkpoint-*")) if d.is_dir() else []


def training(sdir: Path) -> bool:  # a step logged, no checkpoint yet
    return _lines(sdir / "log_history.jsonl") >= 1 and not _ckpts(sdir)


def writing_checkpoint(sdir: Path) -> bool:
    return any(not (c / "trainer_state.json").exists() for c in _ckpts(sdir))


def after_checkpoint(sdir: Path) -> bool:
    return any((c / "trainer_state.json").exists() for c in _ckpts(sdir))


def saving_model(sdir: Path) -> bool:  # the final model dir is being written
    return ((sdir / "model").is_dir() or (sdir / "adapter").is_dir()) and not (sdir / "artifact.json").exists()


def merging(sdir: Path) -> bool:  # atomic_dir's temp dir beside merged/ (C-Poly: inside it)
    merged = sdir / "merged"
    return any(sdir.glob(".merged-*")) or (merged.is_dir() and any(merged.glob(".*")))


def temp_dirs(sdir: Path) -> list[str]:
    """Hidden leftovers of a killed attempt (temp dirs and files; not the lock or space reserve)."""
    merged = sdir / "merged"
    found = [p for p in sdir.glob(".*") if p.name not in (".lock", ".space-reserve")]
    found += list(merged.glob(".*")) if merged.is_dir() else []
    return sorted(str(p.relative_to(sdir)) for p in found)


def merged_no_artifact(sdir: Path) -> bool:
    return (sdir / "merged").is_dir() and not (sdir / "artifact.json").exists()


def evaluating(sdir: Path) -> bool:
    return (sdir / "logs" / "rank0.log").exists() and not (sdir / "artifact.json").exists()


POINTS = [
    ("qilin", "cpt", "training", training), ("qilin", "cpt", "writing a checkpoint", writing_checkpoint),
    ("qilin", "cpt", "after a checkpoint", after_checkpoint), ("qilin", "cpt", "saving the model", saving_model),
    ("qilin", "sft", "training", training), ("qilin", "sft", "writing a checkpoint", writing_checkpoint),
    ("qilin", "sft", "mid-merge", merging), ("qilin", "sft", "merged, no artifact", merged_no_artifact),
    ("qilin", "dpo", "training", training), ("qilin", "dpo", "after a checkpoint", after_checkpoint),
    ("qilin", "dpo", "mid-merge", merging), ("qilin", "eval", "evaluating", evaluating),
    ("medcare", "mka", "training", training), ("medcare", "mka", "after a checkpoint", after_checkpoint),
    ("medcare", "mka", "saving the model", saving_model), ("medcare", "da", "training", training),
    ("medcare", "da", "writing a checkpoint", writing_checkpoint), ("medcare", "da", "saving the model", saving_model),
]


CODE: Path = REPO  # set by snapshot()
ENV = dict(os.environ)


def snapshot(out: Path) -> str:
    """HEAD of the repository laid out as the installed package (medpipe = pipeline/, with stages,
    conf, recipes, samples inside), put first on PYTHONPATH; returns the commit."""
    global CODE
    src = out / "code" / "src"
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "HEAD", "pipeline", "stages", "conf", "recipes", "samples"],
                             cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    pkg = out / "code" / "py" / "medpipe"
    shutil.copytree(src / "pipeline", pkg)
    for name in ("stages", "conf", "recipes", "samples"):
        shutil.copytree(src / name, pkg / name)
    CODE = out / "code"
    ENV["PYTHONPATH"] = str(out / "code" / "py")
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()


def medpipe(args: list[str], log: Path, timeout: float = 1800) -> int:
    with open(log, "ab") as f:
        return subprocess.run([sys.executable, "-m", "medpipe.commands.cli", "run", *args], cwd=CODE, stdout=f,
                              stderr=subprocess.STDOUT, timeout=timeout, env=ENV).returncode


def digests(run_dir: Path) -> dict[str, dict]:
    info = json.loads((run_dir / "run.json").read_text())
    out = {}
    for s in info["stages"]:
        art = json.loads((Path(s["store_dir"]) / "artifact.json").read_text())
        out[s["name"]] = {"content": art.get("content_digest"), "weights": art["metrics"].get("weights_sha256"),
                          "store_dir": s["store_dir"]}
    return out


def stage_dir(run_dir: Path, stage: str) -> Path | None:
    """The store entry the run uses for `stage` (run.json follows rekeying as upstreams finish)."""
    try:
        info = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return None
    return next((Path(s["store_dir"]) for s in info["stages"] if s["name"] == stage), None)


def running(sdir: Path) -> bool:
    """This run's attempt at the stage has begun (a reused or kept-aside entry says done)."""
    try:
        return json.loads((sdir / "status.json").read_text()).get("state") == "running"
    except (OSError, ValueError):
        return False


def kill_at(args: list[str], run_dir: Path, stage: str, trigger, log: Path,
            timeout: float = 900) -> tuple[bool, float, Path | None]:
    """Run, SIGKILL the whole process group when `trigger(entry)` holds for the stage's store entry
    once this run's attempt at the stage has started (status `running`); (fired, seconds, entry)."""
    with open(log, "ab") as f:
        proc = subprocess.Popen([sys.executable, "-m", "medpipe.commands.cli", "run", *args], cwd=CODE, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True, env=ENV)
    t0 = time.monotonic()
    fired, sdir, last_look = False, None, 0.0
    while proc.poll() is None and time.monotonic() - t0 < timeout:
        if time.monotonic() - last_look > 0.2:  # run.json changes only between stages
            sdir, last_look = stage_dir(run_dir, stage), time.monotonic()
        if sdir is not None and running(sdir) and trigger(sdir):
            os.killpg(proc.pid, signal.SIGKILL)
            fired = True
            break
        time.sleep(0.002)
    proc.wait()
    return fired, time.monotonic() - t0, sdir


def analyse(out: Path) -> dict:
    """Every finished version of every stage the campaign produced (live entries and the ones kept
    aside by --from), per stage kind: the distinct trainable-weights sha256 and content digests
    (recomputed with this checkout's medpipe.artifact.record_files). One value each = every killed
    and resumed stage reproduced the uninterrupted run."""
    from medpipe.artifact import Artifact, record_files

    seen: dict[str, dict] = {}
    for d in sorted((out / "runs" / ".store").iterdir()):
        if not (d / "artifact.json").is_file():
            continue
        art = Artifact.load(d)
        live = Path(art.model_path).parent  # the entry's name when it was written
        for field in ("model_path", "tokenizer_path", "merged_path", "dataset_path"):
            value = getattr(art, field)
            if value and Path(value).parent == live:
                setattr(art, field, str(d / Path(value).name))
        art.task_models = {t: str(d / Path(v).relative_to(live)) if Path(v).is_relative_to(live) else v
                           for t, v in art.task_models.items()}
        record_files(art, d, "")
        row = seen.setdefault(art.kind, {"versions": 0, "weights": set(), "content": set()})
        row["versions"] += 1
        row["weights"].add(art.metrics.get("weights_sha256", "")[:16])
        if art.files:
            row["content"].add(art.content_digest[:16])
        else:  # eval stages hand on no files of their own: their scores instead
            from medpipe.artifact import stable_hash

            scores = {k: v for k, v in art.metrics.items() if not any(t in k for t in ("time", "second", "runtime"))}
            row["content"].add("scores:" + stable_hash(scores))
    return {k: {"versions": v["versions"], "weights": sorted(v["weights"]), "content": sorted(v["content"])}
            for k, v in seen.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/medpipe-kill-campaign")
    ap.add_argument("--only", choices=sorted(RECIPES))
    ap.add_argument("--analyse", action="store_true", help="only summarise the versions in an earlier --out")
    args = ap.parse_args()
    if args.analyse:
        print(json.dumps(analyse(Path(args.out)), indent=1))
        return
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    root = out / "runs"
    print(json.dumps({"code": snapshot(out)}), flush=True)
    results = []
    for recipe, overrides in RECIPES.items():
        if args.only and recipe != args.only:
            continue
        base = overrides + [f"run.root={root}"]
        ref_dir = root / f"{recipe}-reference"
        t0 = time.monotonic()
        code = medpipe(base + [f"run.dir={ref_dir}"], out / f"{recipe}-reference.log")
        assert code == 0, f"reference run of {recipe} failed: see {out}/{recipe}-reference.log"
        want = digests(ref_dir)
        print(json.dumps({"reference": recipe, "seconds": round(time.monotonic() - t0, 1),
                          "stages": {k: v["content"] for k, v in want.items()}}), flush=True)
        for i, (r, stage, label, trigger) in enumerate(POINTS):
            if r != recipe:
                continue
            run_dir = root / f"{recipe}-kill{i:02d}"
            log = out / f"{recipe}-kill{i:02d}.log"
            fired, took, sdir = kill_at(base + [f"run.dir={run_dir}", "--from", stage], run_dir, stage, trigger, log)
            sdir = sdir or Path(want[stage]["store_dir"])
            leftovers = temp_dirs(sdir)
            t1 = time.monotonic()
            code = medpipe(base + [f"run.dir={run_dir}"], log)
            got = digests(run_dir) if code == 0 else {}
            same = {k: got.get(k, {}).get("content") == v["content"] and got.get(k, {}).get("weights") == v["weights"]
                    for k, v in want.items()}
            text = log.read_text(errors="replace")
            row = {"point": i, "recipe": recipe, "stage": stage, "at": label, "fired": fired,
                   "killed_after_s": round(took, 1), "rerun_code": code, "rerun_s": round(time.monotonic() - t1, 1),
                   "resumed_from": "resuming from checkpoint-" in text.split("medpipe run")[-1] if fired else None,
                   "temp_left_at_kill": leftovers, "temp_left_after_rerun": temp_dirs(sdir),
                   "same_digests": all(same.values()), "differs": [k for k, v in same.items() if not v]}
            results.append(row)
            print(json.dumps(row), flush=True)
    fired = [r for r in results if r["fired"]]
    ok = [r for r in fired if r["same_digests"] and r["rerun_code"] == 0]
    print(json.dumps({"points": len(results), "fired": len(fired), "same_final_digests": len(ok),
                      "missed": [f"{r['recipe']}/{r['stage']}/{r['at']}" for r in results if not r["fired"]],
                      "differ": [f"{r['recipe']}/{r['stage']}/{r['at']}: {r['differs']}" for r in fired
                                 if not r["same_digests"]]}), flush=True)
    print(json.dumps({"versions_per_kind": analyse(out)}), flush=True)


if __name__ == "__main__":
    main()
