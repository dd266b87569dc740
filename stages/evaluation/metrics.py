"""Evaluation metrics: multiple choice, generation against references, judge replies.

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

PromptCBLUE: stages/evaluation/cblue.py (``promptcblue_scores``).

Judge replies (``parse_judge_scores``, ``parse_pairwise``): strict parsers; anything else is
  malformed and counted by the caller, never guessed.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from typing import Iterable, Sequence

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
