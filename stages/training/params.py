"""Typed parameters shared by the training stages. Light module: the CLI imports it (no torch).
Every field carries its help text (`medpipe list --params KIND` prints it)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional

from medpipe.params import Checked, GlobalBatch, param


@dataclass
class LoraParams(Checked):
    """LoRA through PEFT. `target_modules: [all-linear]` adapts every linear layer but the LM head."""

    _where: ClassVar[str] = "peft."
    type: str = param("lora", "adapter type (PEFT LoRA)")
    r: int = param(8, "LoRA rank")
    alpha: int = param(16, "LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = param(0.05, "dropout on the LoRA input")
    target_modules: List[str] = param(help="module names to adapt, or [all-linear]", factory=lambda: ["all-linear"])

    def _rules(self):
        return [("r", self.r >= 1, ">= 1"), ("alpha", self.alpha > 0, "> 0"), ("dropout", 0 <= self.dropout < 1, "in [0, 1)")]


SPIKE_MODES = ("skip", "halve_loss")


@dataclass
class SpikeGuardParams(Checked):
    """Loss-spike guard: a non-finite gradient norm, or one above `factor` × the median of the last
    `window` steps, is guarded (mode `skip`: the update is skipped; `halve_loss`: IIMedGPT's, the
    update uses the loss × `loss_factor`) and the learning rate is multiplied by `lr_factor` each
    time; more than `max_consecutive` guarded steps in a row fail the stage."""

    _where: ClassVar[str] = "spike_guard."
    enabled: bool = param(False, "guard updates whose gradient norm spikes or is non-finite")
    mode: str = param("skip", "skip (drop the update) | halve_loss (IIMedGPT: apply it with the loss halved)",
                      choices=SPIKE_MODES)
    factor: float = param(10.0, "a spike: grad norm > factor × the median of the last `window` norms")
    window: int = param(20, "steps in the running median of gradient norms")
    lr_factor: float = param(0.5, "the learning rate is multiplied by this at every guarded step")
    loss_factor: float = param(0.5, "mode halve_loss: the guarded step's loss (its gradient) is multiplied by this")
    max_consecutive: int = param(5, "more guarded steps in a row than this fail the stage")

    def _rules(self):
        return [("factor", self.factor > 1, "> 1"), ("window", self.window >= 1, ">= 1"),
                ("lr_factor", 0 < self.lr_factor <= 1, "in (0, 1]"), ("loss_factor", 0 < self.loss_factor < 1, "in (0, 1)"),
                ("max_consecutive", self.max_consecutive >= 1, ">= 1")]


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass
class TrainParams(Checked, GlobalBatch):
    data: Any = param(None, "path | conf/data entry | {path, format, columns, split, limit, weight} | list of those")
    lr: float = param(2e-5, "peak learning rate")
    epochs: float = param(1.0, "passes over the data")
    max_steps: int = param(-1, "> 0: optimizer steps, overrides epochs")
    batch_size: int = param(4, "GLOBAL batch: samples per optimizer step over all ranks (the papers' figure)")
    micro_batch_size: Optional[int] = param(None, "samples per device per forward; accumulation = batch_size / "
                                                  "(micro_batch_size × world size); null = batch_size / world size")
    warmup: float = param(0.0, "< 1: fraction of the total steps; >= 1: steps")
    weight_decay: float = param(0.0, "AdamW weight decay")
    scheduler: str = param("cosine", "any transformers scheduler name (linear, cosine, cosine_with_min_lr, ...)")
    scheduler_kwargs: Dict[str, Any] = param(help="extra scheduler arguments (e.g. {min_lr_rate: 0.1})", factory=dict)
    adam_beta1: float = param(0.9, "AdamW beta1")
    adam_beta2: float = param(0.999, "AdamW beta2")
    max_grad_norm: float = param(1.0, "gradient clipping norm (0 = none)")
    max_length: int = param(1024, "tokens per example (longer ones are cut)")
    peft: Optional[LoraParams] = param(None, "LoRA settings; null = full-parameter training")
    precision: str = param("auto", "auto (bf16 on a GPU that has it, else fp32) | bf16 | fp16 | fp32",
                           choices=PRECISIONS)
    gradient_checkpointing: bool = param(False, "recompute activations in backward (less memory, slower)")
    logging_steps: int = param(5, "optimizer steps between log lines")
    save_steps: int = param(100, "steps between checkpoints: an interrupted stage resumes from the last one")
    save_total_limit: int = param(2, "checkpoints kept")
    heldout: float = param(0.0, "fraction of the data held out for evaluation")
    eval_steps: Optional[int] = param(None, "steps between held-out evaluations; null = save_steps")
    keep_best: bool = param(False, "keep the checkpoint with the lowest held-out loss (needs heldout > 0)")
    on_error: Optional[str] = param(None, "bad records: fail | skip; null = the recipe's data.on_error",
                                    choices=(None, "fail", "skip"))
    num_proc: Optional[int] = param(None, "processes for tokenisation")
    spike_guard: SpikeGuardParams = param(help="loss-spike guard (IIMedGPT)", factory=SpikeGuardParams)

    def _rules(self):
        return [("lr", self.lr > 0, "> 0"),
                ("epochs", self.epochs > 0 or self.max_steps > 0, "> 0 (or max_steps > 0)"),
                ("max_steps", self.max_steps == -1 or self.max_steps > 0, "> 0, or -1 for epochs"),
                ("batch_size", self.batch_size >= 1, ">= 1"),
                ("micro_batch_size", self.micro_batch_size is None or 1 <= self.micro_batch_size <= self.batch_size,
                 f"between 1 and batch_size ({self.batch_size}), or null"),
                ("warmup", self.warmup >= 0, ">= 0 (a fraction < 1, or steps)"),
                ("weight_decay", self.weight_decay >= 0, ">= 0"),
                ("adam_beta1", 0 <= self.adam_beta1 < 1, "in [0, 1)"), ("adam_beta2", 0 <= self.adam_beta2 < 1, "in [0, 1)"),
                ("max_grad_norm", self.max_grad_norm >= 0, ">= 0 (0 = no clipping)"),
                ("max_length", self.max_length >= 1, ">= 1"),
                ("logging_steps", self.logging_steps >= 1, ">= 1"), ("save_steps", self.save_steps >= 1, ">= 1"),
                ("heldout", 0 <= self.heldout < 1, "in [0, 1)"),
                ("keep_best", not self.keep_best or self.heldout > 0, "false unless heldout > 0")]

    def batch_layout(self, world_size: int) -> tuple[int, int]:
        """(per-device micro batch, gradient accumulation steps) that give the global `batch_size`
        on `world_size` ranks; ValueError naming the numbers when they do not divide."""
        micro = self.micro_batch_size
        if micro is None:
            if self.batch_size % world_size:
                raise ValueError(f"batch_size {self.batch_size} (global) does not divide over {world_size} ranks; "
                                 f"set batch_size to a multiple of {world_size} (or set micro_batch_size)")
            return self.batch_size // world_size, 1
        if self.batch_size % (micro * world_size):
            raise ValueError(f"batch_size {self.batch_size} (global) is not micro_batch_size {micro} × {world_size} "
                             f"rank(s) × a whole number of accumulation steps; choose batch_size a multiple of "
                             f"{micro * world_size} or another micro_batch_size")
        return micro, self.batch_size // (micro * world_size)

    def describe_batch(self, world_size: int) -> str:
        """One line for `medpipe show`: the global batch and how it is made on `world_size` ranks."""
        micro, accum = self.batch_layout(world_size)
        return f"global batch {self.batch_size} = {micro} per device × {accum} accumulation × {world_size} rank(s)"


def data_options(params: Any, data_opts: dict) -> dict:
    """load_records options of a stage: its own on_error, else the recipe's data.on_error; the data seed."""
    return {"on_error": params.on_error or data_opts.get("on_error", "fail"), "seed": data_opts.get("seed", 0)}
