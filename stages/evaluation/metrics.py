"""Evaluation metrics: multiple choice, generation against references, PromptCBLUE, judge replies.

Light at import (re/json/collections only); the metric packages are imported inside functions.

Multiple choice
  ``mcq_scores(items, preds)``: accuracy (a prediction is a set of letters; an item is right when
  the set equals the gold set exactly, so a multi-answer item needs every gold letter and no
  other), weighted F1 over answer strings (scikit-learn ``f1_score(average="weighted")`` with the
  sorted letters as the class, e.g. "AC"; a missing prediction is the class "-"), as CMExam and
  Qilin-Med report it; per-subject accuracy where items carry a subject; the count of
  predictions that could not be read (``invalid``).
  ``extract_letters(text, valid)``: the letters of a generated answer. A letter outside the item's
  options is not guessed: the prediction is invalid ("unknown letter").

Generation (``generation_scores(hyps, refs, tokenize=...)``)
  Texts are tokenised first, then scored by maintained packages:
  * ``tokenize="char"`` (default): every CJK character is a token, runs of Latin letters/digits
    are one token (lower-cased), other non-space characters are one token each (punctuation);
    the same split as the BasicTokenizer PromptCBLUE and most Chinese medical papers use.
  * ``tokenize="jieba"``: jieba word segmentation (``jieba.lcut``), whitespace dropped,
    Latin words lower-cased.
  BLEU-1 and BLEU-4: sacrebleu corpus BLEU (``tokenize="none"`` on the space-joined tokens,
  ``max_ngram_order`` 1 / 4, sacrebleu's default exponential smoothing), divided by 100.
  ROUGE-1/2/L: rouge-score ``RougeScorer`` with the tokenizer above (no stemming), F-measure
  averaged over items. Every value is in [0, 1].

PromptCBLUE (``promptcblue_scores(records, outputs)``), as its benchmark scores each task:
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

Judge replies (``parse_judge_scores``, ``parse_pairwise``): strict parsers; anything else is
  malformed and counted by the caller, never guessed.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from typing import Any, Iterable, Sequence

TOKENIZE_MODES = ("char", "jieba")

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff"
_CHAR_TOKEN_RE = re.compile(rf"[{_CJK}]|[A-Za-z0-9]+|[^\s{_CJK}A-Za-z0-9]")


# --- tokenisation -------------------------------------------------------------------------------
def tokenize(text: str, mode: str = "char") -> list[str]:
    """Tokens of ``text`` for BLEU/ROUGE (see the module docstring)."""
    if mode == "char":
        return [t.lower() for t in _CHAR_TOKEN_RE.findall(text or "")]
    if mode == "jieba":
        import logging

        import jieba

        jieba.setLogLevel(logging.WARNING)
        return [t.lower() for t in jieba.lcut(text or "") if t.strip()]
    raise ValueError(f"tokenize must be one of {TOKENIZE_MODES}, got {mode!r}")


class _RougeTokenizer:
    """rouge-score's tokenizer interface (``tokenize(text) -> list[str]``)."""

    def __init__(self, mode: str):
        self.mode = mode

    def tokenize(self, text: str) -> list[str]:
        return tokenize(text, self.mode)


# --- generation metrics -------------------------------------------------------------------------
def bleu(hyps: Sequence[str], refs: Sequence[str], order: int = 4, mode: str = "char") -> float:
    """Corpus BLEU-n (sacrebleu) over pre-tokenised texts, in [0, 1]."""
    from sacrebleu.metrics import BLEU

    h = [" ".join(tokenize(x, mode)) for x in hyps]
    r = [" ".join(tokenize(x, mode)) for x in refs]
    return min(1.0, BLEU(tokenize="none", max_ngram_order=order).corpus_score(h, [r]).score / 100.0)


def rouge(hyps: Sequence[str], refs: Sequence[str], mode: str = "char",
          types: Sequence[str] = ("rouge1", "rouge2", "rougeL")) -> dict[str, float]:
    """Mean ROUGE F-measures (rouge-score) with the given tokenisation, in [0, 1]."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(list(types), use_stemmer=False, tokenizer=_RougeTokenizer(mode))
    totals = dict.fromkeys(types, 0.0)
    for h, r in zip(hyps, refs):
        s = scorer.score(r, h)  # score(target, prediction)
        for t in types:
            totals[t] += s[t].fmeasure
    n = max(1, len(hyps))
    return {t: v / n for t, v in totals.items()}


def generation_scores(hyps: Sequence[str], refs: Sequence[str], tokenize: str = "char") -> dict[str, float]:
    """BLEU-1, BLEU-4, ROUGE-1, ROUGE-2, ROUGE-L of hypotheses against one reference each."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    if not refs:
        raise ValueError("no references to score against")
    missing = [i for i, r in enumerate(refs) if not (r or "").strip()]
    if missing:
        raise ValueError(f"{len(missing)} item(s) have an empty reference (first: #{missing[0]})")
    r = rouge(hyps, refs, mode=tokenize)
    return {"bleu1": bleu(hyps, refs, 1, tokenize), "bleu4": bleu(hyps, refs, 4, tokenize),
            "rouge1": r["rouge1"], "rouge2": r["rouge2"], "rougeL": r["rougeL"]}


# --- multiple choice ----------------------------------------------------------------------------
_CUE_LETTERS_RE = re.compile(
    r"(?:答案(?:应该|应|是|为|选)*|[Tt]he (?:correct )?answer (?:is|should be)|[Aa]nswer)\s*[:：]?\s*"
    r"[(（\[]?\s*([A-Z](?:\s*(?:[、,，/和与及]|and|&)?\s*[A-Z](?![A-Za-z]))*)(?![A-Za-z])")
_LEAD_LETTERS_RE = re.compile(r"^\s*[(（\[]?\s*([A-Z](?:\s*[、,，/]?\s*[A-Z])*)(?=\s*$|\s*[.．、,，:：)）\]\n])")


def extract_letters(text: str | None, valid: Iterable[str]) -> tuple[list[str] | None, str | None]:
    """Letters of a generated multiple-choice answer.

    Looks for an answer cue ("答案为AC", "答案：A、C", "The answer is B", "Answer: (D)") first,
    else letters at the very start of the text ("AC", "B. ...", "(A)"). Returns (sorted letters,
    None) or (None, reason) with reason "no_answer" or "unknown_letter" (a letter that is not
    one of the item's options: the prediction is invalid, never mapped to a guess)."""
    valid = set(valid)
    text = text or ""
    m = _CUE_LETTERS_RE.search(text) or _LEAD_LETTERS_RE.match(text)
    if not m:
        return None, "no_answer"
    letters = sorted(set(re.findall(r"[A-Z]", m.group(1))))
    if any(x not in valid for x in letters):
        return None, "unknown_letter"
    return letters, None


def _answer_class(letters: Sequence[str] | None) -> str:
    return "".join(sorted(letters)) if letters else "-"


def mcq_scores(items: Sequence[dict], preds: Sequence[Sequence[str] | None]) -> dict:
    """Accuracy, weighted F1, invalid count, per-subject accuracy over the labeled items.

    ``preds[i]`` is the predicted letter list (a single letter for scoring methods) or None
    (unreadable generation). Raises ValueError when no item has a gold answer."""
    from sklearn.metrics import f1_score

    pairs = [(it, p) for it, p in zip(items, preds) if it.get("answer")]
    if not pairs:
        raise ValueError("no item has a gold answer (answer column empty or missing): "
                         "accuracy needs labeled items")
    gold = [_answer_class(it["answer"]) for it, _ in pairs]
    pred = [_answer_class(p) for _, p in pairs]
    correct = [g == p for g, p in zip(gold, pred)]
    out: dict = {
        "n": len(pairs),
        "acc": sum(correct) / len(pairs),
        "f1_weighted": float(f1_score(gold, pred, average="weighted", zero_division=0)),
        "invalid": sum(p is None for _, p in pairs),
        "unlabeled": len(items) - len(pairs),
    }
    multi = [c for (it, _), c in zip(pairs, correct) if len(it["answer"]) > 1]
    if multi:
        out["acc_multi"] = sum(multi) / len(multi)
        out["n_multi"] = len(multi)
    subjects: dict[str, list[bool]] = defaultdict(list)
    for (it, _), c in zip(pairs, correct):
        if it.get("subject"):
            subjects[str(it["subject"])].append(c)
    if subjects:
        out["subjects"] = {s: {"n": len(v), "acc": sum(v) / len(v)} for s, v in sorted(subjects.items())}
    return out


# --- PromptCBLUE --------------------------------------------------------------------------------
CBLUE_EXTRACTION = ("CMeEE-V2", "IMCS-V2-NER", "CMeIE-V2", "CHIP-CDN", "CHIP-CDEE", "CHIP-MDCFNPC",
                    "IMCS-V2-SR", "CMedCausal")
CBLUE_TREE = ("Text2DT",)  # tree edit ratio (stages/text2dt.py)
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


# --- judge replies ------------------------------------------------------------------------------
JUDGE_ASPECTS = ("fluency", "relevance", "completeness", "proficiency")
_JSON_OBJ_RE = re.compile(r"\{[^{}]*\}", re.S)


def parse_judge_scores(reply: str | None) -> dict[str, int] | None:
    """The four 1-5 scores from a judge reply: exactly one JSON object whose keys include every
    aspect with an integer 1..5 (JSON may sit inside a code fence or text). None = malformed."""
    objs = _JSON_OBJ_RE.findall(reply or "")
    found = []
    for o in objs:
        try:
            d = json.loads(o)
        except ValueError:
            continue
        if isinstance(d, dict):
            found.append(d)
    if len(found) != 1:
        return None
    d = {str(k).lower(): v for k, v in found[0].items()}
    out = {}
    for a in JUDGE_ASPECTS:
        v = d.get(a)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 5:
            return None
        out[a] = v
    return out


_VERDICT_RE = re.compile(r"\b(win|lose|tie)\b", re.I)


def parse_pairwise(reply: str | None) -> str | None:
    """'win' | 'lose' | 'tie' when the reply names exactly one of them (case-insensitive,
    whole word); None = malformed (none or several)."""
    found = {m.lower() for m in _VERDICT_RE.findall(reply or "")}
    return found.pop() if len(found) == 1 else None
