"""The before → after table of a run beside its paper's: one row per metric, one column per
evaluated model (the base model first, then each stage in run order), the change from the first
to the last measured value, and the paper's values for the same cells (the recipe's `reference:`
block) with their change and a plain note when the paper's model or data are not this run's.
`medpipe report` writes it into report.md / report.html and as report.csv / report.json; `medpipe
run` prints it when the pipeline ends.

Units: accuracies, F1, BLEU, ROUGE, win rates and PromptCBLUE scores in % (as the papers print
them; a change is in points); perplexity, losses, margins, lengths and judge scores (1–5) as they
are. Counts (invalid answers, malformed judge replies, tokens) are left out of the table.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

RAW = ("ppl", "loss", "margin", "len_after", "len_before")  # not ratios: shown as they are
COUNTS = ("invalid", "judge_malformed", "malformed", "tokens", "n", "seconds")
HEAD_TAIL = ["change", "paper", "paper change", "note"]


def metric_name(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def scale(key: str, value: Any) -> float | None:
    """A metric in display units (ratios ×100), None when not a number."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        return None
    name = metric_name(key)
    if name in RAW or name.startswith("judge_"):
        return float(value)
    return float(value) * 100


def fmt(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "–"
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def references(config: dict) -> list[dict]:
    return [r for r in (config.get("reference") or []) if isinstance(r, dict)]


def _run_data(config: dict, set_name: str, n: int | None) -> str:
    from medpipe.compose import package_dir

    samples = str(package_dir("samples"))
    sample = samples in repr(config.get("data") or {})
    items = f"{n}-item " if n else ""
    return f"the {items}bundled sample" if sample else f"{items}{set_name}".strip()


def _same(a: str, b: str) -> bool:
    norm = lambda s: "".join(c for c in s.lower() if c.isalnum())  # noqa: E731
    return bool(a) and norm(a) == norm(b)


def table(data: dict) -> dict:
    """{"stages": [...], "rows": [{metric, values{stage: v}, change, paper[], paper_change, note}],
    "paper_only": [reference entries with no counterpart in this run], "model": str}."""
    import yaml

    config = yaml.safe_load(data.get("config") or "") or {}
    model = str((config.get("model") or {}).get("name") or "?")
    stages = list(data["rows"])
    refs = references(config)
    keys: list[str] = []
    for st in stages:
        for k, v in data["evals"][st].items():
            if "/" in k and k not in keys and metric_name(k) not in COUNTS and scale(k, v) is not None:
                keys.append(k)
    n_of = {}
    for per_set in data["results"].values():
        for set_name, res in per_set.items():
            n_of.setdefault(set_name, res.get("n"))
    rows, used = [], set()
    for k in keys:
        values = {st: scale(k, data["evals"][st].get(k)) for st in stages}
        measured = [v for v in values.values() if v is not None]
        change = measured[-1] - measured[0] if len(measured) > 1 else None
        mine = [r for r in refs if r.get("metric") == k and r.get("stage") in stages]
        mine.sort(key=lambda r: stages.index(r["stage"]))
        used.update(id(r) for r in mine)
        paper = [{"stage": r["stage"], "row": r.get("row"), "table": r.get("table"), "column": r.get("column"),
                  "value": float(r["value"])} for r in mine]
        paper_change = paper[-1]["value"] - paper[0]["value"] if len(paper) > 1 else None
        note = ""
        if mine:
            paper_model = next((r.get("row") for r in mine if r.get("stage") == "base"), mine[0].get("row"))
            set_name = k.rsplit("/", 1)[0]
            run_data = _run_data(config, set_name, n_of.get(set_name))
            diffs = [] if _same(model, str(paper_model)) else ["model"]
            if "bundled sample" in run_data:
                diffs.append("data")
            note = (f"paper ({mine[0].get('table')}): {paper_model} on {mine[0].get('data') or set_name}; "
                    f"this run: {model} on {run_data}" + (f" ({' and '.join(diffs)} differ)" if diffs else ""))
        rows.append({"metric": k, "values": values, "change": change, "paper": paper,
                     "paper_change": paper_change, "note": note})
    paper_only = [r for r in refs if id(r) not in used]
    return {"stages": stages, "rows": rows, "paper_only": paper_only, "model": model}


def paper_cell(row: dict) -> str:
    return " → ".join(f"{p['value']:g} ({p['stage']})" for p in row["paper"])


def text_rows(t: dict) -> tuple[list[str], list[list[str]]]:
    head = ["metric"] + t["stages"] + HEAD_TAIL
    body = [[r["metric"]] + [fmt(r["values"][s]) for s in t["stages"]]
            + [fmt(r["change"], True), paper_cell(r), fmt(r["paper_change"], True), r["note"]] for r in t["rows"]]
    return head, body


def paper_only_rows(t: dict) -> tuple[list[str], list[list[str]]]:
    head = ["table", "row", "column", "value", "why not beside a run value"]
    body = []
    for r in t["paper_only"]:
        if r.get("stage") is None:
            why = "another setting than this recipe's default"
        elif not r.get("metric"):
            why = "this recipe measures no counterpart"
        else:
            why = f"{r['metric']} not measured on stage {r['stage']} in this run"
        body.append([str(r.get("table")), str(r.get("row")), str(r.get("column")), f"{float(r['value']):g}", why])
    return head, body


def chance_note(data: dict, model: str) -> str | None:
    """One line for the tiny random model: its exam scores sit at chance."""
    if model != "tiny":
        return None
    if not any(res.get("kind") == "mcq" for per in data["results"].values() for res in per.values()):
        return None
    return ("note: the tiny model is randomly initialised, so its exam accuracies sit at chance "
            "(1 / number of options); the held-out figures (heldout_*) show what each stage learnt.")


def write_exports(run_dir: Path, t: dict) -> tuple[Path, Path]:
    """report.csv (one row per metric, display units) and report.json (the same, plus the paper-only rows)."""
    import csv
    import io
    import json

    from medpipe.artifact import write_text_atomic

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["metric"] + t["stages"] + ["change", "paper", "paper_change", "note"])
    for r in t["rows"]:
        w.writerow([r["metric"]] + ["" if r["values"][s] is None else round(r["values"][s], 4) for s in t["stages"]]
                   + ["" if r["change"] is None else round(r["change"], 4), paper_cell(r),
                      "" if r["paper_change"] is None else round(r["paper_change"], 4), r["note"]])
    csv_path = write_text_atomic(run_dir / "report.csv", buf.getvalue())
    json_path = write_text_atomic(run_dir / "report.json", json.dumps(t, indent=1, ensure_ascii=False, default=str))
    return csv_path, json_path


def render_terminal(t: dict, data: dict) -> list[str]:
    """Plain lines for the end of `medpipe run`: the table without the note column, notes after it."""
    if not t["rows"]:
        return []
    head, body = text_rows(t)
    head = head[:-1]
    body = [r[:-1] for r in body]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in body]
    notes = sorted({r["note"] for r in t["rows"] if r["note"]})
    out += notes
    chance = chance_note(data, t["model"])
    if chance:
        out.append(chance)
    return out

