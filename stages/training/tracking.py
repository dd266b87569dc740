"""Trackers, stage side: which of transformers' integrations the stage's trainer reports to.

The driver (medpipe.tracking) sets MEDPIPE_TRACKING and each tracker's own environment (MLflow:
MLFLOW_RUN_ID of the stage's child run; W&B: WANDB_RUN_GROUP / WANDB_NAME); the launchers pass it
to every rank, and the integrations log on rank 0 only. Without a driver (a hand-started rank):
TensorBoard, as before.
"""
from __future__ import annotations

import os
from typing import Any

from medpipe.tracking import KNOWN, STAGE_ENV


def report_kwargs(ctx: Any) -> dict:
    """`report_to` and `run_name` for TrainingArguments (and TRL configs)."""
    names = [n for n in (os.environ.get(STAGE_ENV) or "tensorboard").split(",") if n in KNOWN]
    return {"report_to": names or ["tensorboard"], "run_name": os.environ.get("MEDPIPE_RUN_NAME") or ctx.name}
