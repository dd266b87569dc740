"""Preference rows for TRL's preference trainers (ORPO, CPO/SimPO: pairs; KTO: unpaired good/bad
answers), from medpipe's normalised preference records ({prompt: [messages], chosen, rejected}).
Light module (no torch)."""
from __future__ import annotations

from typing import Callable


def pair_rows(records: list[dict], say: Callable[[str], None]) -> list[dict]:
    """TRL's conversational preference rows; identical chosen/rejected pairs teach nothing: dropped, counted."""
    rows, same = [], 0
    for r in records:
        if r["chosen"].strip() == r["rejected"].strip():
            same += 1
            continue
        rows.append({"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                     "rejected": [{"role": "assistant", "content": r["rejected"]}]})
    if same:
        say(f"warning: {same} pair(s) with chosen == rejected dropped")
    return rows


def unpaired_rows(records: list[dict], say: Callable[[str], None]) -> list[dict]:
    """KTO's unpaired rows: each pair gives its chosen answer as desirable (label true) and its
    rejected answer as undesirable (label false), as TRL's `unpair_preference_dataset` does."""
    rows = []
    for r in pair_rows(records, say):
        rows.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
        rows.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
    return rows
