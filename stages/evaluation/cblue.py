"""PromptCBLUE (``promptcblue_scores(records, outputs)``), scored as its benchmark scores each task:
  the generated text and the target are both parsed into structures by the task's rules
  (PromptCBLUE's post-processing), then
  * extraction tasks (CMeEE-V2, IMCS-V2-NER, CMeIE-V2, CHIP-CDN, CHIP-CDEE, CHIP-MDCFNPC,
    IMCS-V2-SR): micro-F1 over the extracted tuples;
  * classification tasks (CHIP-CTC, KUAKE-QIC, IMCS-V2-DAC: macro-F1; CHIP-STS, KUAKE-IR,
    KUAKE-QTR, KUAKE-QQR: weighted F1), scikit-learn ``classification_report``; an empty
    prediction counts as the task's first label;
  * generation tasks (MedDG; IMCS-V2-MRG per report section): ROUGE-L F on characters.
  A dataset not in these lists falls back on its ``task_type`` (``cls``/``matching`` →
  weighted F1, ``ner``/``*extraction``/``normalization`` → micro-F1 over lines, generation
  types → ROUGE-L); ``score`` is the mean of the per-task scores (their Overall).
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from typing import Any, Sequence

from .metrics import rouge

CBLUE_EXTRACTION = ("CMeEE-V2", "IMCS-V2-NER", "CMeIE-V2", "CHIP-CDN", "CHIP-CDEE", "CHIP-MDCFNPC",
                    "IMCS-V2-SR", "CMedCausal")
CBLUE_TREE = ("Text2DT",)  # tree edit ratio (text2dt.py)
CBLUE_CLS_MACRO = ("CHIP-CTC", "KUAKE-QIC", "IMCS-V2-DAC")
CBLUE_CLS_WEIGHTED = ("CHIP-STS", "KUAKE-IR", "KUAKE-QTR", "KUAKE-QQR")
CBLUE_GENERATION = ("MedDG", "IMCS-V2-MRG")
_MRG_KEYS = ("主诉", "现病史", "辅助检查", "既往史", "诊断", "建议")


def cblue_kind(dataset: str, task_type: str | None = None) -> str:
    """'extraction' | 'cls_macro' | 'cls_weighted' | 'generation' | 'tree' for a PromptCBLUE dataset."""
    if dataset in CBLUE_TREE:
        return "tree"
    if dataset in CBLUE_EXTRACTION:
        return "extraction"
    if dataset in CBLUE_CLS_MACRO:
        return "cls_macro"
    if dataset in CBLUE_CLS_WEIGHTED:
        return "cls_weighted"
    if dataset in CBLUE_GENERATION:
        return "generation"
    t = (task_type or "").lower()
    if t in ("cls", "matching", "classification"):
        return "cls_weighted"
    if "generation" in t or t in ("nlg", "dialogue", "summary"):
        return "generation"
    if t:
        return "extraction"
    raise ValueError(f"unknown PromptCBLUE task {dataset!r} with no task_type")


def _split_items(s: str) -> list[str]:
    return [w.strip() for w in s.split("，") if w.strip()]


def cblue_structure(dataset: str, text: str, choices: Sequence[str] | None = None,
                    task_type: str | None = None) -> Any:
    """PromptCBLUE's post-processing of one output text into a structure (a set of tuples for
    extraction tasks, a label for classification, a string or {section: text} for generation)."""
    text = text or ""
    choices = list(choices or [])
    kind = cblue_kind(dataset, task_type)
    lines = text.split("\n")
    if dataset in ("CMeEE-V2", "IMCS-V2-NER"):
        out = set()
        for line in lines:
            m = re.match(r"^\s*(.+?)实体[：:](.*)$", line)
            if m and (not choices or m.group(1).strip() in choices):
                out |= {(m.group(1).strip(), w) for w in _split_items(m.group(2))}
        return out
    if dataset == "CMeIE-V2":
        out = set()
        for line in lines:
            predicate = line.split("关系的头尾实体对")[0][2:].strip()
            rest = line.replace(f"具有{predicate}关系的头尾实体对如下：", "")
            for spo in rest.split("。"):
                parts = spo.split("，尾实体为")
                if len(parts) < 2:
                    continue
                out.add((predicate, parts[0].replace("头实体为", "").strip(), parts[1].replace("尾实体为", "").strip()))
        return out
    if dataset == "CHIP-CDN":
        answers = _split_items(lines[-1]) if lines else []
        return {(w,) for w in answers if not choices or w in choices}
    if dataset == "CHIP-CDEE":
        out = set()
        keys = ("主体词", "发生状态", "描述词", "解剖部位")
        for line in lines[1:]:
            ev = dict.fromkeys(keys, "")
            for attr in line.split("；"):
                for k in keys:
                    if attr.startswith(f"{k}："):
                        v = attr[len(k) + 1:].strip()
                        ev[k] = tuple(_split_items(v)) if k in ("描述词", "解剖部位") else v
            if any(ev.values()):
                out.add(tuple(json.dumps(ev[k], ensure_ascii=False) for k in keys))
        return out
    if dataset in ("CHIP-MDCFNPC", "IMCS-V2-SR"):
        out = set()
        for line in lines[1:]:
            parts = line.split("：")
            if len(parts) == 2:
                out.add((parts[0].strip(), parts[1].strip()))
        return out
    if dataset == "CMedCausal":
        return _cmedcausal(lines)
    if dataset == "Text2DT":
        from medpipe.stages.evaluation.text2dt import parse_text2dt

        return parse_text2dt(text)
    if dataset == "CHIP-STS":
        t = text.strip()
        return {"相同": "是的", "不同": "不是"}.get(t, t)
    if dataset == "IMCS-V2-MRG":
        sections = {}
        for key in _MRG_KEYS:
            for line in text.strip().split("\n")[1:]:
                if line.startswith(key + "："):
                    sections[key] = line.strip().split(key + "：")[-1].strip()
        return sections
    if kind in ("cls_macro", "cls_weighted"):
        return text.strip()
    if kind == "generation":
        return text.strip()
    return {tuple([ln.strip()]) for ln in lines if ln.strip()}  # other extraction tasks: one tuple per line


_CAUSAL_HEADERS = (("因果关系三元组", "因果关系"), ("条件关系三元组", "条件关系"), ("上下位关系", "上下位关系"))


def _cmedcausal(lines: Sequence[str]) -> set:
    """CMedCausal triples as PromptCBLUE parses them: a header line names the relation
    (因果/条件/上下位), then "头实体：X；尾实体：Y" per triple; a 条件关系 triple's tail is itself a
    causal triple ("…；尾三元组：头实体：A；尾实体：B；关系：因果关系"). Tuples are the JSON of
    (object, predicate, subject), so a nested tail compares as a whole. Lines that do not parse
    are skipped, not guessed."""
    out, rel = set(), None
    for line in (ln.strip() for ln in lines):
        header = next((r for key, r in _CAUSAL_HEADERS if key in line), None)
        if header:
            rel = header
            continue
        if "给定的文本没有指定关系的三元组" in line:
            break
        if rel is None or "头实体：" not in line:
            continue
        head = line.split("头实体：", 1)[1]
        if rel == "条件关系":
            if "；尾三元组：" not in head:
                continue
            subject, tail = head.split("；尾三元组：", 1)
            if "头实体：" not in tail or "；尾实体：" not in tail:
                continue
            t_head, t_rest = tail.split("头实体：", 1)[1].split("；尾实体：", 1)
            t_obj, _, t_rel = t_rest.partition("；关系：")
            obj: Any = {"predicate": t_rel.split("；关系：")[0].strip() or "因果关系", "subject": t_head.strip(),
                        "object": t_obj.strip()}
        else:
            if "；尾实体：" not in head:
                continue
            subject, obj = head.split("；尾实体：", 1)
            obj = obj.strip()
        triple = {"predicate": rel, "subject": subject.strip(), "object": obj}
        out.add(tuple(json.dumps(triple[k], ensure_ascii=False) for k in sorted(triple)))
    return out


def _micro_f1(golds: Sequence[set], preds: Sequence[set]) -> float:
    tp = fp = fn = 0
    for g, p in zip(golds, preds):
        tp += len(g & p)
        fp += len(p - g)
        fn += len(g - p)
    if not tp:
        return 0.0
    prec, rec = tp / (tp + fp), tp / (tp + fn)
    return 2 * prec * rec / (prec + rec)


def _rouge_l_chars(hyps: Sequence[str], refs: Sequence[str]) -> float:
    # PromptCBLUE replaces an empty text by "无。" before scoring
    hyps = [h if h.strip() else "无。" for h in hyps]
    refs = [r if r.strip() else "无。" for r in refs]
    return rouge(hyps, refs, mode="char", types=("rougeL",))["rougeL"]


def promptcblue_scores(records: Sequence[dict], outputs: Sequence[str]) -> dict:
    """Per-dataset PromptCBLUE scores and their mean.

    ``records``: raw PromptCBLUE rows (``target``, ``task_dataset``, ``task_type``,
    ``answer_choices``); ``outputs``: the generated texts. Returns
    ``{"score": mean, "tasks": {dataset: {"metric": name, "score": x, "n": n}}}``."""
    from sklearn.metrics import classification_report

    by_task: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_task[r.get("task_dataset") or r.get("task_type") or "promptcblue"].append(i)
    tasks: dict[str, dict] = {}
    for name, idx in sorted(by_task.items()):
        ttype = records[idx[0]].get("task_type")
        kind = cblue_kind(name, ttype)
        gold = [cblue_structure(name, records[i]["target"], records[i].get("answer_choices"), ttype) for i in idx]
        pred = [cblue_structure(name, outputs[i], records[i].get("answer_choices"), ttype) for i in idx]
        if kind == "extraction":
            tasks[name] = {"metric": "micro_f1", "score": _micro_f1(gold, pred), "n": len(idx)}
        elif kind == "tree":
            from medpipe.stages.evaluation.text2dt import tree_edit_ratio

            tasks[name] = {"metric": "tree_lenv_ratio", "score": tree_edit_ratio(gold, pred), "n": len(idx)}
        elif kind.startswith("cls"):
            choices = records[idx[0]].get("answer_choices") or []
            first = choices[0] if isinstance(choices, list) and choices else (gold[0] if gold else "")
            pred = [p if p else first for p in pred]
            rep = classification_report(gold, pred, output_dict=True, zero_division=0)
            avg = "macro avg" if kind == "cls_macro" else "weighted avg"
            tasks[name] = {"metric": "macro_f1" if kind == "cls_macro" else "f1",
                           "score": float(rep[avg]["f1-score"]), "n": len(idx)}
        elif name == "IMCS-V2-MRG":
            hyps, refs = [], []
            for g, p in zip(gold, pred):
                for key, text in g.items():
                    refs.append(text)
                    hyps.append(p.get(key, ""))
            tasks[name] = {"metric": "rougeL", "score": _rouge_l_chars(hyps, refs) if refs else 0.0, "n": len(idx)}
        else:
            tasks[name] = {"metric": "rougeL", "score": _rouge_l_chars(pred, gold), "n": len(idx)}
    return {"score": sum(t["score"] for t in tasks.values()) / len(tasks) if tasks else 0.0, "tasks": tasks}
