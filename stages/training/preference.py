"""Preference rows for TRL's preference trainers (ORPO, CPO/SimPO: pairs; KTO: unpaired good/bad
answers), from medpipe's normalised preference records ({prompt: [messages], chosen, rejected}).
Light module (no torch)."""
from __future__ import annotations

from typing import Any, Callable


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


def check_pairs(params: Any, base: Any, data_opts: dict, want: str = "preference") -> list[str]:
    """`check` of the preference kinds (dpo, orpo, cpo; kto with want="feedback"): every record read
    and measured against `max_length` with the input model's tokenizer — prompt + the longer
    response, through the chat template when there is one; those over max_length are counted (TRL
    cuts them per truncation_mode) — ; the data summary's lines."""
    from medpipe.data import load_records
    from medpipe.stages.training.params import data_options
    from medpipe.stages.training.tokenizer import length_tokenizer

    tok = length_tokenizer(base.tokenizer_path, base.trust_remote_code)
    return load_records(params.data, want, tokenizer=tok, max_length=params.max_length,
                        **data_options(params, data_opts)).summary_table().splitlines()


def load_rows(ctx: Any, p: Any, rows_of: Callable = pair_rows) -> tuple[list[dict], list[dict], int]:
    """The stage's training rows, held-out rows (`rows_of`: pair_rows or unpaired_rows) and how many
    training pairs were read; no usable pair is one line naming the stage and the data."""
    from medpipe.data import load_records
    from medpipe.errors import MedpipeError
    from medpipe.stages.training.params import data_options

    loaded = load_records(p.data, "preference", heldout=p.heldout, **data_options(p, ctx.data))
    rows = rows_of(loaded.records, ctx.say)
    if not rows:
        raise MedpipeError(f"stages.{ctx.name}: no usable preference pairs in {p.data}")
    return rows, (rows_of(loaded.heldout, ctx.say) if loaded.heldout else []), len(loaded.records)
