"""Typed parameters shared by the training stages. Light module: the CLI imports it (no torch)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class LoraParams:
    """LoRA through PEFT. `target_modules: [all-linear]` adapts every linear layer but the LM head."""

    type: str = "lora"
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])


@dataclass
class SpikeGuardParams:
    """IIMedGPT-style loss-spike guard: a non-finite gradient norm, or one above `factor` × the
    median of the last `window` steps, skips that update and multiplies the learning rate by
    `lr_factor`; more than `max_consecutive` skips in a row fail the stage."""

    enabled: bool = False
    factor: float = 10.0
    window: int = 20
    lr_factor: float = 0.5
    max_consecutive: int = 5


@dataclass
class TrainParams:
    data: Any = None  # path | conf/data entry | {path, format, columns, split, limit, weight} | list of those
    lr: float = 2e-5
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 4  # per device
    grad_accum: int = 1
    warmup: float = 0.0  # < 1: fraction of total steps; >= 1: steps
    weight_decay: float = 0.0
    scheduler: str = "cosine"  # any transformers scheduler name (linear, cosine, cosine_with_min_lr, ...)
    scheduler_kwargs: Dict[str, Any] = field(default_factory=dict)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    max_length: int = 1024
    peft: Optional[LoraParams] = None  # null = full-parameter training
    precision: str = "auto"  # auto (bf16 on a GPU that has it, else fp32) | bf16 | fp16 | fp32
    gradient_checkpointing: bool = False
    logging_steps: int = 5
    save_steps: int = 100  # Trainer checkpoints: an interrupted stage resumes from the last one
    save_total_limit: int = 2
    heldout: float = 0.0  # fraction of the data held out for evaluation
    eval_steps: Optional[int] = None  # default: save_steps
    keep_best: bool = False  # keep the checkpoint with the lowest held-out loss (needs heldout > 0)
    on_error: Optional[str] = None  # fail | skip; default: the recipe's data.on_error
    num_proc: Optional[int] = None  # processes for tokenisation
    spike_guard: SpikeGuardParams = field(default_factory=SpikeGuardParams)


def data_options(params: Any, data_opts: dict) -> dict:
    """load_records options of a stage: its own on_error, else the recipe's data.on_error; the data seed."""
    return {"on_error": params.on_error or data_opts.get("on_error", "fail"), "seed": data_opts.get("seed", 0)}
