"""`medpipe report RUN_DIR`: report.md and report.html for a run, PNG curves in report_files/.

Contents: recipe and run facts, every stage's status / time / artifact / tokens seen / training
summary, the before → after table beside the paper's values (before_after.py; also report.csv and
report.json), the metrics table (one row per evaluated stage, one column per `<set>/<metric>`), the
per-subject accuracy of mcq sets, pairwise judge verdicts, loss curves per training stage (train
and held-out loss; for DPO also the reward margin and accuracy), and the resolved config.

Where the metrics come from (docs/EVAL.md, "Records", documents the shapes):
* eval stages of the run: the artifact's `metrics` join the row of `evaluated_stage`;
* `medpipe eval` results: `<run_dir>/eval/<stage>.json` (`evaluated_stage`, `metrics`, `results`);
* `medpipe compare` results: `<run_dir>/eval/pairwise-*.json` (`line`, `summary`).
Ratios (accuracy, F1, BLEU, ROUGE, PromptCBLUE scores) are shown in percent; judge scores on
their 1–5 scale; counts as integers.
Light at import; matplotlib (Agg backend) is imported when curves are drawn.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from medpipe import history

from .before_after import RAW

TRAIN_KEYS = ("first_loss", "last_loss", "best_eval_loss", "reward_accuracy", "reward_margin")
COUNT_SUFFIXES = ("invalid", "judge_malformed")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def evaluates(kind: str) -> bool:
    """Whether a stage kind scores another stage's model (class attribute `evaluates`, eval's hook)
    rather than training one: its metrics join the evaluated stage's row, it has no curves."""
    from medpipe import registry

    return kind in registry.kinds() and registry.load(kind).evaluates


def collect(run_dir: Path) -> dict:
    """Everything the report shows, as plain data."""
    from medpipe.artifact import Artifact, ArtifactError
    from medpipe.store import read_run_file, stage_table

    info = read_run_file(Path(run_dir))  # a torn run.json is an error naming it
    table = {r["stage"]: r for r in stage_table(run_dir)}
    stages, evals, results = [], {}, {}
    order = ["base"]
    for s in info["stages"]:
        sdir = Path(s["store_dir"])
        try:  # a torn artifact.json: the stage shows as broken (stage_table says why), no metrics
            art = Artifact.load(sdir) if Artifact.exists(sdir) and table.get(s["name"], {}).get("state") == "done" else None
        except ArtifactError:
            art = None
        row = {**s, **table.get(s["name"], {}), "dir": sdir, "artifact_obj": art,
               "history": [] if evaluates(s["kind"]) else history.read(sdir)}
        stages.append(row)
        if not evaluates(s["kind"]):
            order.append(s["name"])
        elif art is not None:
            target = art.evaluated_stage or s["name"]
            evals.setdefault(target, {}).update(art.metrics)
            for set_name, res in (art.results or {}).items():
                results.setdefault(target, {})[set_name] = res
    pairwise = []
    for path in sorted((run_dir / "eval").glob("*.json")) if (run_dir / "eval").is_dir() else []:
        data = _read_json(path)
        if path.name.startswith("pairwise-"):
            if data.get("summary"):
                pairwise.append(data)
            continue
        target = data.get("evaluated_stage") or path.stem
        evals.setdefault(target, {}).update(data.get("metrics") or {})
        for set_name, res in (data.get("results") or {}).items():
            results.setdefault(target, {})[set_name] = res
    rows = [name for name in order if name in evals] + [n for n in evals if n not in order]
    return {"info": info, "stages": stages, "evals": evals, "results": results, "rows": rows,
            "pairwise": pairwise, "config": (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""}


def fmt_metric(key: str, value: Any) -> str:
    if value is None:
        return "–"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    name = key.rsplit("/", 1)[-1]
    if name.endswith(COUNT_SUFFIXES) or name in ("n",):
        return str(int(value))
    if name.startswith("judge_"):
        return f"{value:.2f}"
    if name in RAW:  # perplexity, losses, margins, lengths: not ratios
        return f"{value:.4g}"
    if 0.0 <= value <= 1.0:
        return f"{value * 100:.1f}"
    return f"{value:.4g}"


def _fmt_num(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def draw_curves(stage: dict, out: Path) -> Path | None:
    """Loss (train, held-out) per step; for DPO also reward margin and accuracy; for MedCare the
    parts of the loss (cross-entropy, orthogonal / balance term, each on its own axis). None if
    no log."""
    hist = stage["history"]
    loss = [(h["step"], h["loss"]) for h in hist if isinstance(h.get("loss"), (int, float))]
    if not loss:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evl = [(h["step"], h["eval_loss"]) for h in hist if isinstance(h.get("eval_loss"), (int, float))]
    margins = [(h["step"], h["rewards/margins"]) for h in hist if isinstance(h.get("rewards/margins"), (int, float))]
    accs = [(h["step"], h["rewards/accuracies"]) for h in hist if isinstance(h.get("rewards/accuracies"), (int, float))]
    parts = {k: [(h["step"], h[k]) for h in hist if isinstance(h.get(k), (int, float))]
             for k in ("ce_loss", "orth_loss", "balance_loss")}
    parts = {k: v for k, v in parts.items() if v}
    if not parts.keys() - {"ce_loss"}:  # CE alone is the loss panel again
        parts = {}
    panels = 1 + bool(margins) + bool(parts)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.4), dpi=110, squeeze=False)
    ax = axes[0][0]
    ax.plot(*zip(*loss), marker="o", ms=3, label="train loss")
    if evl:
        ax.plot(*zip(*evl), marker="s", ms=3, label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{stage['name']} ({stage['kind']}): loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if margins:
        ax2 = axes[0][1]
        ax2.plot(*zip(*margins), marker="o", ms=3, color="tab:green", label="reward margin")
        ax2.set_xlabel("step")
        ax2.set_ylabel("chosen − rejected reward")
        ax2.set_title(f"{stage['name']}: reward margin")
        ax2.axhline(0, color="grey", lw=0.8)
        ax2.grid(alpha=0.3)
        if accs:
            ax3 = ax2.twinx()
            ax3.plot(*zip(*accs), ls="--", color="tab:orange", label="reward accuracy")
            ax3.set_ylim(0, 1.05)
            ax3.set_ylabel("reward accuracy")
            lines = ax2.get_lines()[:1] + ax3.get_lines()
            ax2.legend(lines, [l.get_label() for l in lines], fontsize=8, loc="lower right")
        else:
            ax2.legend(fontsize=8)
    if parts:  # MedCare: CE on the left axis, the extra term (orders of magnitude apart) on the right
        axp = axes[0][panels - 1]
        lines = []
        if "ce_loss" in parts:
            lines += axp.plot(*zip(*parts["ce_loss"]), marker="o", ms=3, label="cross-entropy")
            axp.set_ylabel("cross-entropy")
        extra = [k for k in ("orth_loss", "balance_loss") if k in parts]
        if extra:
            axe = axp.twinx() if "ce_loss" in parts else axp
            for k, color in zip(extra, ("tab:red", "tab:purple")):
                label = "orthogonal loss Σ|A_KA A_Alignᵀ|" if k == "orth_loss" else "balance loss"
                lines += axe.plot(*zip(*parts[k]), ls="--", marker="^", ms=3, color=color, label=label)
            axe.set_ylabel(" / ".join("orthogonal" if k == "orth_loss" else "balance" for k in extra))
        axp.set_xlabel("step")
        axp.set_title(f"{stage['name']}: loss parts")
        axp.grid(alpha=0.3)
        axp.legend(lines, [l.get_label() for l in lines], fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _columns(data: dict) -> list[str]:
    """`<set>/<metric>` columns grouped by set (sets and metrics in order of first appearance)."""
    sets: dict[str, list[str]] = {}
    for name in data["rows"]:
        for k, v in data["evals"][name].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and "/" in k:
                group = sets.setdefault(k.rsplit("/", 1)[0], [])
                if k not in group:
                    group.append(k)
    return [c for group in sets.values() for c in group]


def print_summary(run_dir: Path, console: Any) -> None:
    """The end of `medpipe run`: the before → after table, so the terminal shows what every stage
    changed (`medpipe report` writes it with the rest)."""
    from .before_after import render_terminal, table

    data = collect(Path(run_dir))
    lines = render_terminal(table(data), data)
    if not lines:
        return
    console.rule("Before → after: the base model, then each stage (% for accuracy, BLEU, ROUGE)")
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    console.print(f"report.md / .html / .csv / .json: medpipe report {run_dir}", markup=False, highlight=False,
                  soft_wrap=True)


def build(run_dir: str | Path) -> tuple[Path, Path]:
    """Write report.md, report.html, report.csv, report.json and report_files/*.png into the run dir."""
    from medpipe.artifact import write_text_atomic

    from .before_after import table, write_exports

    run_dir = Path(run_dir)
    data = collect(run_dir)
    data["before_after"] = table(data)
    write_exports(run_dir, data["before_after"])
    files = run_dir / "report_files"
    curves = {}
    for s in data["stages"]:
        if not evaluates(s["kind"]):
            png = draw_curves(s, files / f"{s['link']}.png")
            if png:
                curves[s["name"]] = png.relative_to(run_dir).as_posix()
    md = render_md(data, curves)
    page = render_html(data, curves)
    return write_text_atomic(run_dir / "report.md", md), write_text_atomic(run_dir / "report.html", page)


def _stage_rows(data: dict) -> list[list[str]]:
    rows = []
    for s in data["stages"]:
        art = s["artifact_obj"]
        m = art.metrics if art else {}
        elapsed = f"{s['elapsed']:.0f}s" if s.get("elapsed") else ""
        if s.get("attempts", 0) > 1:  # elapsed is the sum over the attempts
            elapsed += f" ({s['attempts']} attempts)"
        if art is None:
            what = ""
        elif art.handoff.get("skipped"):
            what = f"evaluates {art.evaluated_stage}: {art.handoff['skipped']}"
        elif art.evaluated_stage:
            what = f"evaluates {art.evaluated_stage or '?'}"
        else:
            what = f"{art.format}: {art.model_path}"
        train = ", ".join(f"{k} {_fmt_num(m[k])}" for k in TRAIN_KEYS if isinstance(m.get(k), (int, float)))
        state = s.get("state", "pending") + (f" ({s['error']})" if s.get("error") and s.get("state") in ("failed", "broken") else "")
        rows.append([s["name"], s["kind"], state, elapsed, _fmt_num(m.get("tokens_seen")) if m.get("tokens_seen") else "",
                     train, what])
    return rows


STAGE_HEAD = ["stage", "kind", "status", "time", "tokens seen", "training", "artifact"]


def _subject_tables(data: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """Per mcq set with subjects: (set, header, rows) with one column per evaluated stage."""
    out = []
    sets: dict[str, dict[str, dict]] = {}
    for stage in data["rows"]:
        for set_name, res in data["results"].get(stage, {}).items():
            if res.get("subjects"):
                sets.setdefault(set_name, {})[stage] = res["subjects"]
    for set_name, per_stage in sets.items():
        stages = list(per_stage)
        subjects = sorted({s for v in per_stage.values() for s in v})
        rows = []
        for subj in subjects:
            n = next((per_stage[st][subj]["n"] for st in stages if subj in per_stage[st]), 0)
            rows.append([subj, str(n)] + [f"{per_stage[st][subj]['acc'] * 100:.1f}" if subj in per_stage[st] else "–"
                                          for st in stages])
        out.append((set_name, ["subject", "n"] + stages, rows))
    return out


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = lambda c: str(c).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _metric_table(data: dict) -> tuple[list[str], list[list[str]]]:
    cols = _columns(data)
    rows = [[name] + [fmt_metric(c, data["evals"][name].get(c)) for c in cols] for name in data["rows"]]
    return ["stage"] + cols, rows


def render_md(data: dict, curves: dict) -> str:
    info = data["info"]
    out = [f"# medpipe report: {info.get('name')}", "",
           f"- recipe: `{info.get('recipe')}`", f"- created: {info.get('created')}",
           f"- stages: {' → '.join(s['name'] for s in info['stages'])}", "", "## Stages", "",
           _md_table(STAGE_HEAD, _stage_rows(data)), ""]
    out += _md_before_after(data)
    out += ["## Metrics", ""]
    if data["rows"]:
        head, rows = _metric_table(data)
        out += ["One row per evaluated stage. Accuracy, F1, BLEU, ROUGE and PromptCBLUE scores in %; "
                "judge scores 1–5; `invalid` = unreadable answers.", "", _md_table(head, rows), ""]
    else:
        out += ["No evaluation results yet (add an `eval` stage, or run `medpipe eval RUN_DIR --stage S data=...`).", ""]
    for set_name, head, rows in _subject_tables(data):
        out += [f"### {set_name}: accuracy per subject (%)", "", _md_table(head, rows), ""]
    if data["pairwise"]:
        out += ["## Pairwise judging", ""] + [f"- {p['line']}" for p in data["pairwise"]] + [""]
    if curves:
        out += ["## Training curves", ""] + [f"![{name}]({png})" for name, png in curves.items()] + [""]
    out += ["## Resolved config", "", "```yaml", data["config"].rstrip(), "```", ""]
    return "\n".join(out)


BEFORE_AFTER_NOTE = ("Each metric on the base model and after each stage (accuracy, F1, BLEU, ROUGE, win rates in %; "
                     "changes in points), the change from the first to the last value, and the paper's reported values "
                     "for the same cells (the recipe's `reference:`). Also in report.csv and report.json.")


def _before_after_tables(data: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    from .before_after import chance_note, paper_only_rows, text_rows

    t = data.get("before_after")
    if not t:
        return []
    out = []
    if t["rows"]:
        out.append(("", *text_rows(t)))
    if t["paper_only"]:
        out.append(("The paper's values with no counterpart in this run", *paper_only_rows(t)))
    note = chance_note(data, t["model"])
    if note:
        out.append((note, [], []))
    return out


def _md_before_after(data: dict) -> list[str]:
    parts = _before_after_tables(data)
    if not parts:
        return []
    out = ["## Before → after, beside the paper", "", BEFORE_AFTER_NOTE, ""]
    for title, head, rows in parts:
        if title:
            out += [f"{title}:" if head else title, ""]
        if head:
            out += [_md_table(head, rows), ""]
    return out


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1200px;
color:#222;padding:0 1rem}h1{font-size:1.6rem}h2{margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.9rem}th,td{border:1px solid #ccc;padding:.3rem .6rem;
text-align:left;vertical-align:top}th{background:#f3f5f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafbfc}.state-done{color:#1a7f37}.state-failed{color:#cf222e}
.state-running,.state-interrupted{color:#9a6700}pre{background:#f6f8fa;padding:1rem;overflow:auto;font-size:.8rem}
.curves img{max-width:100%;border:1px solid #eee;margin:.3rem 0}.note{color:#555;font-size:.9rem}
.wide{overflow-x:auto}td.path{font-family:ui-monospace,monospace;font-size:.8rem;word-break:break-all}"""


def _html_table(head: list[str], rows: list[list[str]], num_from: int = 99, classes: dict | None = None) -> str:
    e = html.escape
    out = ["<table><thead><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in rows:
        cells = []
        for i, c in enumerate(r):
            cls = "num" if i >= num_from else (classes or {}).get(i, "")
            if classes and i in classes and classes[i] == "state":
                cls = f"state-{str(c).split(' ')[0]}"
            cells.append(f"<td class=\"{cls}\">{e(str(c))}</td>" if cls else f"<td>{e(str(c))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _html_metric_table(head: list[str], rows: list[list[str]]) -> str:
    """Two header rows: the eval set (spanning its metrics), then the metric names."""
    e = html.escape
    groups: list[tuple[str, int]] = []
    for col in head[1:]:
        set_name = col.rsplit("/", 1)[0]
        if groups and groups[-1][0] == set_name:
            groups[-1] = (set_name, groups[-1][1] + 1)
        else:
            groups.append((set_name, 1))
    top = "<tr><th rowspan=\"2\">stage</th>" + "".join(f"<th colspan=\"{n}\">{e(g)}</th>" for g, n in groups) + "</tr>"
    sub = "<tr>" + "".join(f"<th>{e(c.rsplit('/', 1)[-1])}</th>" for c in head[1:]) + "</tr>"
    body = "".join("<tr><td>" + e(r[0]) + "</td>" + "".join(f"<td class=\"num\">{e(c)}</td>" for c in r[1:]) + "</tr>"
                   for r in rows)
    return f"<div class=\"wide\"><table><thead>{top}{sub}</thead><tbody>{body}</tbody></table></div>"


def render_html(data: dict, curves: dict) -> str:
    e = html.escape
    info = data["info"]
    parts = [f"<!doctype html><html><head><meta charset=\"utf-8\"><title>medpipe report: {e(str(info.get('name')))}"
             f"</title><style>{CSS}</style></head><body>",
             f"<h1>medpipe report: {e(str(info.get('name')))}</h1>",
             f"<p>recipe <code>{e(str(info.get('recipe')))}</code> · created {e(str(info.get('created')))} · "
             f"stages {e(' → '.join(s['name'] for s in info['stages']))}</p>",
             "<h2>Stages</h2>", _html_table(STAGE_HEAD, _stage_rows(data), classes={2: "state", 6: "path"})]
    parts_ba = _before_after_tables(data)
    if parts_ba:
        parts += ["<h2>Before → after, beside the paper</h2>", f"<p class=\"note\">{e(BEFORE_AFTER_NOTE)}</p>"]
        for title, head, rows in parts_ba:
            if title:
                parts.append(f"<p class=\"note\">{e(title)}</p>")
            if head:
                parts.append(f"<div class=\"wide\">{_html_table(head, rows, num_from=1)}</div>")
    parts.append("<h2>Metrics</h2>")
    if data["rows"]:
        head, rows = _metric_table(data)
        parts += ["<p class=\"note\">One row per evaluated stage. Accuracy, F1, BLEU, ROUGE and PromptCBLUE scores "
                  "in %; judge scores 1–5; <code>invalid</code> = unreadable answers.</p>",
                  _html_metric_table(head, rows)]
    else:
        parts.append("<p class=\"note\">No evaluation results yet (add an <code>eval</code> stage, or run "
                     "<code>medpipe eval RUN_DIR --stage S data=...</code>).</p>")
    for set_name, head, rows in _subject_tables(data):
        parts += [f"<h3>{e(set_name)}: accuracy per subject (%)</h3>", _html_table(head, rows, num_from=1)]
    if data["pairwise"]:
        parts += ["<h2>Pairwise judging</h2><ul>"] + [f"<li>{e(p['line'])}</li>" for p in data["pairwise"]] + ["</ul>"]
    if curves:
        parts += ["<h2>Training curves</h2><div class=\"curves\">"]
        parts += [f"<div><img src=\"{e(png)}\" alt=\"{e(name)} curves\"></div>" for name, png in curves.items()]
        parts.append("</div>")
    parts += ["<h2>Resolved config</h2>", f"<details><summary>config.yaml</summary><pre>{e(data['config'])}</pre></details>",
              "</body></html>"]
    return "\n".join(parts)
