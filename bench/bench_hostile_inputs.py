"""Hostile-input campaign (issue 28): every case of tests/test_bad_inputs.py (or those whose name
contains --only), run as `medpipe validate` in a process of its own under a time limit, with this
checkout's code and, for comparison, another checkout's (--baseline-python: a venv whose editable
install is that checkout, e.g. /work/main/.venv/bin/python). Each outcome is classified:

  refused    exit 2, exactly one `medpipe: error:` line, no traceback
  silent     exit 0 (validate accepted it)
  traceback  a Python traceback, or another exit code
  hang       still running at --timeout (killed)
  abort      killed by a signal (memory: rc 134 / 137)

    .venv/bin/python bench/bench_hostile_inputs.py [--baseline-python /work/main/.venv/bin/python] [--only gguf]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def classify(code: int | None, out: str) -> str:
    if code is None:
        return "hang"
    if code < 0 or code in (134, 137):
        return "abort"
    if "Traceback" in out:
        return "traceback"
    if code == 0:
        return "silent"
    errors = [ln for ln in out.splitlines() if ln.startswith("medpipe: error:")]
    return "refused" if code == 2 and len(errors) == 1 else "traceback"


def run_case(python: str, name: str, timeout: float) -> tuple[str, str]:
    import test_bad_inputs as cases

    tmp = Path(tempfile.mkdtemp(prefix=f"hostile-{name}-"))
    try:
        try:
            recipe, overrides, _ = cases.CASES[name](tmp)
        except BaseException as e:  # noqa: BLE001 - a case that cannot be built here (pytest.skip)
            return "skipped", str(e).splitlines()[0] if str(e) else type(e).__name__
        proc = subprocess.Popen([python, "-m", "medpipe.commands.cli", "validate", f"recipe={recipe}",
                                 f"run.root={tmp}/runs", *overrides], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            out, code = proc.communicate()[0], None
        last = next((ln for ln in reversed(out.splitlines()) if ln.strip()), "")
        return classify(code, out), last[:160]
    finally:
        for m in list(cases.MOUNTS):
            os.system(f"umount {m}")
            cases.MOUNTS.remove(m)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline-python", help="python of a venv with the baseline checkout installed")
    ap.add_argument("--only", help="cases whose name contains one of these (comma-separated)")
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args()
    import test_bad_inputs as cases

    names = sorted(n for n in cases.CASES if not args.only or any(w in n for w in args.only.split(",")))
    pythons = {"this": sys.executable}
    if args.baseline_python:
        pythons["baseline"] = args.baseline_python
    totals = {k: Counter() for k in pythons}
    for name in names:
        row = {"case": name}
        for label, python in pythons.items():
            outcome, last = run_case(python, name, args.timeout)
            totals[label][outcome] += 1
            row[label] = outcome
            row[f"{label}_says"] = last
        print(json.dumps(row, ensure_ascii=False), flush=True)
    print(json.dumps({"cases": len(names), **{k: dict(v) for k, v in totals.items()}}), flush=True)


if __name__ == "__main__":
    main()
