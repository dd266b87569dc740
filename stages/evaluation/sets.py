"""Reading and planning eval sets: every source of `data` is one set, of the kind its format adapter
names (`Format.evaluated_as` in medpipe.data.formats: mcq, generation, promptcblue), records in file
order with `limit` applied, refused with a file:line error when they cannot be scored."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

READS_AS = {"mcq": "mcq", "generation": "chat", "promptcblue": "chat"}  # eval set kind → the records read

# protocol=lm-eval: lm-eval task names → (format, file in its published shape, source options, the
# recipe data name of the same split or None). The splits are those the tasks evaluate: MedQA US
# 4-option test (jind11's data_clean/questions/US/4_options/phrases_no_exclude_test.jsonl =
# GBaker/MedQA-USMLE-4-options-hf test), MedMCQA's dev.json (original release, cop 1-4 = the task's
# `validation`), PubMedQA's PQA-L test (bigbio pubmed_qa_labeled_fold0 test = pqal_test_set.json),
# MMLU's test split (hendrycks/test data/test/<subject>_test.csv = cais/mmlu test), C-Eval's val
# split (ceval-exam.zip val/<subject>_val.csv: lm-eval's ceval-valid_*), CMMLU's test split
# (haonan-li/CMMLU data/test/<subject>.csv, header ",Question,A,B,C,D,Answer").
# Where found: the recipe's data section (conf/data/public.yaml under data.root: medqa_test,
# medmcqa_dev, pubmedqa_pqal_test), else the file under `data_dir` (or $MEDPIPE_EVAL_DATA): in a
# folder named after the task, directly, or in the release's split folder (test/, val/).
MMLU_MEDICAL = ("anatomy", "clinical_knowledge", "college_medicine", "medical_genetics", "professional_medicine",
                "college_biology")  # multimedqa.yaml's MMLU subjects, in its order
CEVAL_MEDICAL = ("clinical_medicine", "basic_medicine", "physician", "veterinary_medicine")  # = lmeval.CEVAL_SUBJECTS_ZH
CMMLU_MEDICAL = ("anatomy", "clinical_knowledge", "college_medical_statistics", "college_medicine", "genetics",
                 "human_sexuality", "nutrition", "professional_medicine", "traditional_chinese_medicine", "virology")
CMMLU_COLUMNS = {"": "id", "Question": "question", "Answer": "answer"}  # as conf/data/public.yaml's cmmlu_* entries
LM_EVAL_TASKS = {"medqa_4options": ("medqa", "phrases_no_exclude_test.jsonl", {}, "medqa_test"),
                 "medmcqa": ("medmcqa", "dev.json", {"cop_base": 1}, "medmcqa_dev"),
                 "pubmedqa": ("pubmedqa", "pqal_test_set.json", {}, "pubmedqa_pqal_test"),
                 **{f"mmlu_{s}": ("mmlu", f"{s}_test.csv", {}, None) for s in MMLU_MEDICAL},
                 **{f"ceval-valid_{s}": ("ceval", f"{s}_val.csv", {}, None) for s in CEVAL_MEDICAL},
                 **{f"cmmlu_{s}": ("ceval", f"{s}.csv", {"columns": CMMLU_COLUMNS}, None) for s in CMMLU_MEDICAL}}
SPLIT_DIRS = {"mmlu_": "test", "ceval-valid_": "val", "cmmlu_": "test"}  # the release's folder of that split
# lm-eval's multimedqa group (tasks/benchmarks/multimedqa/multimedqa.yaml), its order
LM_EVAL_GROUPS = {"multimedqa": ["pubmedqa", "medmcqa", "medqa_4options", *(f"mmlu_{s}" for s in MMLU_MEDICAL)]}


def task_candidates(name: str, root: str) -> list[Path]:
    """Where the local file of lm-eval task `name` may be under `root`, in the order looked at."""
    file = LM_EVAL_TASKS[name][1]
    split = next((d for prefix, d in SPLIT_DIRS.items() if name.startswith(prefix)), None)
    return [Path(root) / name / file, Path(root) / file] + ([Path(root) / split / file] if split else [])


def task_groups(p: Any) -> dict[str, list[str]]:
    """The lm-eval groups named in `p.data` (protocol lm-eval) → their tasks."""
    if getattr(p, "protocol", "") != "lm-eval":
        return {}
    named = p.data if isinstance(p.data, list) else [p.data]
    return {g: LM_EVAL_GROUPS[g] for g in named if isinstance(g, str) and g in LM_EVAL_GROUPS}


def expand_task_names(data: Any, data_dir: str | None, data_opts: dict | None = None) -> Any:
    """lm-eval task / group names in `data` → source dicts of the local files (others unchanged)."""
    import os

    from medpipe.errors import ConfigError

    items = data if isinstance(data, list) else [data]
    out: list = []
    for d in items:
        names = LM_EVAL_GROUPS.get(d, [d]) if isinstance(d, str) else [d]
        for name in names:
            if not (isinstance(name, str) and name in LM_EVAL_TASKS):
                out.append(name)
                continue
            fmt, file, opts, public = LM_EVAL_TASKS[name]
            named = (data_opts or {}).get(public)
            if isinstance(named, dict) and named.get("path"):  # data=public: the recipe names this split
                out.append({**named, "task": name})
                continue
            root = data_dir or os.environ.get("MEDPIPE_EVAL_DATA")
            found = next((c for c in task_candidates(name, root) if c.is_file()), None) if root else None
            if found is None:
                looked = ", ".join(str(c) for c in task_candidates(name, root or "DIR"))
                where = f"(looked for {looked})" if root else f"(set data_dir=DIR or $MEDPIPE_EVAL_DATA: {looked})"
                also = f"; or compose data=public data.root=DIR ({public})" if public else ""
                cols = ", columns: {'': id, Question: question, Answer: answer}" if "columns" in opts else ""
                raise ConfigError(f"lm-eval task {name}: no {file} {where}{also}; or give data={{path: ..., "
                                  f"format: {fmt}{cols}, task: {name}}}")
            out.append({"path": str(found), "format": fmt, "task": name, **opts})
    return out if isinstance(data, list) or len(out) > 1 else out[0]


@dataclass
class EvalSet:
    name: str
    kind: str  # mcq | generation | promptcblue
    fmt: str
    records: list
    source: Any = None
    report: Any = None  # the data layer's SourceReport: read / kept / dropped, for validate's table


def _source_format(src: Any) -> str:
    from medpipe.data import detect_format
    from medpipe.data.sources import expand_paths

    if src.format and src.format != "auto":
        from medpipe.data.formats import FORMAT_ALIASES

        return FORMAT_ALIASES.get(src.format, src.format)
    return detect_format(expand_paths(src)[0], src.columns)[0]


def _set_kind(fmt: str, src: Any) -> str:
    """The eval set kind of a format, or a DataError listing the formats each kind takes."""
    from medpipe.data import DataError
    from medpipe.data.formats import FORMATS

    spec = FORMATS.get(fmt)
    if spec is not None and spec.evaluated_as:
        return spec.evaluated_as
    takes = {k: [f.name for f in FORMATS.values() if f.evaluated_as == k] for k in READS_AS}
    raise DataError(f"format '{fmt}' cannot be evaluated ("
                    + "; ".join(f"{k}: {', '.join(names)}" for k, names in takes.items()) + ")",
                    src.path, None, "format", reason="format")


def plan_sets(p: Any, data_opts: dict | None = None) -> list[EvalSet]:
    """Read and validate every eval set (records in file order, `limit` applied)."""
    from medpipe.errors import ConfigError
    from medpipe.data import DataError, parse_spec
    from medpipe.data.validate import read_source

    if p.data is None:
        raise ConfigError("eval: `data` is required (one eval set per source: mcq, chat or PromptCBLUE data)")
    on_error = p.on_error or (data_opts or {}).get("on_error") or "fail"
    sets: list[EvalSet] = []
    seen: dict[str, int] = {}
    suffix = "+rag" if p.rag.index is not None else ""
    data = (expand_task_names(p.data, getattr(p, "data_dir", None), data_opts) if getattr(p, "protocol", "") == "lm-eval"
            else p.data)
    for src in parse_spec(data):
        fmt = _source_format(src)
        kind = _set_kind(fmt, src)
        if kind == "promptcblue":
            records, report = read_promptcblue(src, on_error)
        else:
            records, report = read_source(src, READS_AS[kind], on_error)
        if p.limit and len(records) > p.limit:
            report.drop("limit", len(records) - p.limit)
            records = records[: p.limit]
        report.kept = len(records)
        if not records:
            raise DataError("no records to evaluate", src.path, None, None, reason="empty_dataset")
        if kind == "generation":
            for r in records:
                msgs = r["messages"]
                if msgs[-1]["role"] != "assistant" or not str(msgs[-1]["content"]).strip():
                    raise DataError("no reference answer: a generation eval set needs each conversation to end "
                                    "with a non-empty assistant turn", r.get("_loc", src.path), None, "messages",
                                    reason="no_reference")
        if kind == "mcq" and not any(r.get("answer") for r in records):
            raise DataError("no reference answers: every item is unlabeled, accuracy cannot be computed",
                            src.path, None, "answer", reason="no_reference")
        name = src.task or (fmt if kind == "mcq" else Path(src.path).stem)
        name = re.sub(r"[^\w.+-]+", "_", name) + suffix
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}-{seen[name]}"
        sets.append(EvalSet(name, kind, fmt, records, src, report))
    return sets


def sets_table(sets: list[EvalSet]) -> list[str]:
    """validate's view of the eval sets, one row each: records read, kept (scored), dropped and
    why (skipped lines, `limit`), and items read but unlabeled (answered, not scored)."""
    hdr = ["set", "kind", "source", "format", "read", "kept", "dropped", "why dropped", "unlabeled"]
    rows = []
    for s in sets:
        r = s.report
        why = ", ".join(f"{k}={v}" for k, v in sorted(r.dropped_by_reason.items())) or "-"
        unlabeled = sum(1 for x in s.records if not x.get("answer")) if s.kind == "mcq" else 0
        rows.append([s.name, s.kind, Path(r.path).name, r.format, str(r.records), str(r.kept), str(r.dropped), why,
                     str(unlabeled)])
    w = [max(len(h), *(len(x[i]) for x in rows)) for i, h in enumerate(hdr)]
    line = lambda cells: "  ".join(c.ljust(w[i]) for i, c in enumerate(cells)).rstrip()  # noqa: E731
    return [line(hdr), line(["-" * x for x in w])] + [line(x) for x in rows]


def _shot_key(rec: dict) -> tuple:
    """What makes an example the item itself (prompts.pick_shots never gives an item itself)."""
    return rec.get("question"), tuple(sorted((rec.get("options") or {}).items()))


def check_pool(pool: list[dict], p: Any, sets: list[EvalSet] | None = None) -> None:
    """`shots=k` needs k labeled examples in `fewshot_data`: an unlabeled split (a test file given
    as the dev split) would otherwise run fewer shots than the results say. Counted per item of the
    multiple-choice `sets` too: an item in the pool is never its own example, so a pool of k that is
    also the eval set gives each item k-1 shots while the result would say k."""
    from collections import Counter

    from medpipe.data import DataError, parse_spec

    if not p.shots:
        return
    labeled = [e for e in pool if e.get("answer")]
    where = ", ".join(s.path for s in parse_spec(p.fewshot_data)) if p.fewshot_data is not None else "fewshot_data"
    if len(labeled) < p.shots:
        raise DataError(f"fewshot_data: {len(labeled)} of {len(pool)} example(s) have an answer; shots={p.shots} "
                        f"needs at least {p.shots} labeled examples (is this an unlabeled test split?)",
                        where, None, None, reason="no_reference")
    if getattr(p, "protocol", "native") != "native":
        return   # the harness protocols pick their shots their own way
    copies = Counter(_shot_key(e) for e in labeled)
    for s in sets or []:
        for item in s.records if s.kind == "mcq" else []:
            gets = len(labeled) - copies.get(_shot_key(item), 0)
            if gets < p.shots:
                raise DataError(f"fewshot_data: this item is also in the pool ({where}) and is never its own "
                                f"example, so it gets {gets} of shots={p.shots}; give the pool at least "
                                f"{p.shots + copies[_shot_key(item)]} labeled examples or set shots={gets}",
                                *_loc_parts(item), "fewshot_data", reason="too_few_shots")


def _loc_parts(rec: dict) -> tuple:
    path, _, line = str(rec.get("_loc") or "eval set:").rpartition(":")
    return path, (int(line) if line.isdigit() else line or None)


def read_promptcblue(src: Any, on_error: str) -> tuple[list[dict], Any]:
    """Raw PromptCBLUE rows (input, target, answer_choices, task_type, task_dataset, sample_id),
    validated through the data layer first (so errors name path:line)."""
    from medpipe.data.readers import RawReader
    from medpipe.data.sources import expand_paths
    from medpipe.data.validate import read_source

    _, report = read_source(src, "chat", on_error)  # validation, and the read / kept / dropped counts
    rows = []
    for path in expand_paths(src):
        reader = RawReader(path, on_error)
        for line, raw in reader:
            if not isinstance(raw, dict) or not str(raw.get("input") or "").strip() or raw.get("target") is None:
                continue
            rows.append({**raw, "_loc": f"{path}:{line}"})
            if src.limit and len(rows) >= src.limit:
                return rows, report
    return rows, report


def read_pool(spec: Any, on_error: str) -> list[dict]:
    """The k-shot example pool (`fewshot_data`): mcq records of every source, file order."""
    from medpipe.data import parse_spec
    from medpipe.data.validate import read_source

    pool: list[dict] = []
    for src in parse_spec(spec):
        pool += read_source(src, "mcq", on_error)[0]
    return pool
