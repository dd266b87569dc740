"""What the training stages share: model/tokenizer loading, LoRA, TrainingArguments from params,
progress and metric callbacks, the loss-spike guard, checkpoint resume and saving the result.
Imported only inside `run()` (it imports torch and transformers)."""
from __future__ import annotations

import functools
import json
import math
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from medpipe.artifact import Artifact
from medpipe.errors import MedpipeError
from medpipe.stages.models import loader


def data_cache_dir(ctx: Any) -> Path:
    """Where tokenised/packed data is cached (data.cache_dir, default $MEDPIPE_CACHE/data): a stage
    rerun with a changed hyperparameter does not re-tokenise."""
    from medpipe.paths import cache_root

    return Path(ctx.data.get("cache_dir") or cache_root() / "data").expanduser()


def load_tokenizer(ctx: Any, path: str | None = None):
    return loader.load_tokenizer(path or ctx.input.tokenizer_path, bool(ctx.model.get("trust_remote_code", False)))


def use_bf16(params: Any) -> bool:
    return loader.use_bf16(getattr(params, "precision", "auto"))


def load_model(ctx: Any, params: Any, path: str | None = None):
    """The stage's input model for training (dtype policy: medpipe.stages.models.loader)."""
    dtype = loader.pick_dtype(ctx.model.get("dtype"), training=True, lora=getattr(params, "peft", None) is not None,
                              precision=getattr(params, "precision", "auto"))
    model = loader.load_causal_lm(path or ctx.input.model_path, dtype=dtype,
                                  trust_remote_code=bool(ctx.model.get("trust_remote_code", False)),
                                  attn_implementation=ctx.model.get("attn_implementation"))
    if getattr(params, "gradient_checkpointing", False):
        model.config.use_cache = False
    return model


apply_lora = loader.apply_lora


def training_kwargs(ctx: Any, p: Any) -> dict:
    """TrainingArguments (and TRL config) fields from the stage params; one place for all stages."""
    cuda = torch.cuda.is_available()
    kw = dict(
        output_dir=str(ctx.output_dir / "checkpoints"),
        learning_rate=p.lr, num_train_epochs=p.epochs, max_steps=p.max_steps,
        per_device_train_batch_size=p.batch_size, per_device_eval_batch_size=p.batch_size,
        gradient_accumulation_steps=p.grad_accum, warmup_steps=p.warmup, weight_decay=p.weight_decay,
        lr_scheduler_type=p.scheduler, lr_scheduler_kwargs=dict(p.scheduler_kwargs),
        adam_beta1=p.adam_beta1, adam_beta2=p.adam_beta2, max_grad_norm=p.max_grad_norm,
        logging_steps=p.logging_steps, save_strategy="steps", save_steps=p.save_steps,
        save_total_limit=p.save_total_limit, report_to=["tensorboard"], seed=ctx.seed, data_seed=ctx.seed,
        use_cpu=not cuda, bf16=use_bf16(p), fp16=p.precision == "fp16",
        activation_checkpointing=p.gradient_checkpointing, deepspeed=ctx.deepspeed_config,
        disable_tqdm=True, dataloader_num_workers=0, include_num_input_tokens_seen="non_padding",
    )
    if not cuda and int(__import__("os").environ.get("WORLD_SIZE", "1")) > 1:
        kw["ddp_backend"] = "gloo"
    if p.heldout > 0:
        steps = p.eval_steps or p.save_steps
        kw.update(eval_strategy="steps", eval_steps=steps, save_steps=steps)
        if p.keep_best:
            kw.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
    return kw


class ProgressCallback(TrainerCallback):
    """Step progress on the terminal and every log line in `log_history.jsonl` (for the report)."""

    def __init__(self, ctx: Any):
        self.ctx, self.t0 = ctx, time.monotonic()
        self.path = ctx.output_dir / "log_history.jsonl"

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": state.global_step, **logs}) + "\n")
        shown = " ".join(f"{k}={v:.4g}" for k, v in logs.items() if isinstance(v, float) and k in
                         ("loss", "eval_loss", "learning_rate", "grad_norm", "rewards/accuracies", "rewards/margins",
                          "orth_loss", "ce_loss"))
        if shown:  # the trainer's end-of-training summary has none of these: the stage prints its own
            elapsed = time.monotonic() - self.t0
            self.ctx.say(f"step {state.global_step}/{state.max_steps} {shown} ({elapsed:.0f}s)")


class SpikeGuard(TrainerCallback):
    """Skips updates whose gradient norm is non-finite or spikes, lowering the learning rate.

    The pre-clipping norm is read by wrapping the trainer's `_get_grad_norm`, and the update is
    skipped by wrapping `optimizer.step` (see `install`). Under DeepSpeed the engine steps inside
    backward, so there the guard counts and lowers the lr but the skip is DeepSpeed's own
    (fp16 overflow handling)."""

    def __init__(self, cfg: Any, ctx: Any):
        self.cfg, self.ctx = cfg, ctx
        self.norms: list[float] = []
        self.last_norm: float | None = None
        self.skip = False
        self.consecutive = 0
        self.skipped = 0

    def install(self, trainer) -> None:
        original = trainer._get_grad_norm

        def record(model, grad_norm=None):
            value = original(model, grad_norm=grad_norm)
            self.last_norm = float(value) if value is not None else None
            return value

        trainer._get_grad_norm = record

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        step = optimizer.step

        # wraps() keeps the marker the lr scheduler put on the step it wrapped, so torch does not
        # warn that the step was "overridden after learning rate scheduler initialization"
        @functools.wraps(step)
        def guarded_step(*a, **k):
            if self.skip:
                self.skip = False
                return None
            return step(*a, **k)

        optimizer.step = guarded_step

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, lr_scheduler=None, model=None, **kwargs):
        norm = self.last_norm
        if norm is None:
            return
        recent = self.norms[-self.cfg.window:]
        spike = not math.isfinite(norm) or (len(recent) >= 5 and norm > self.cfg.factor * statistics.median(recent))
        if not spike:
            self.norms.append(norm)
            self.consecutive = 0
            return
        self.skip = True
        self.skipped += 1
        self.consecutive += 1
        model.zero_grad(set_to_none=True)
        if lr_scheduler is not None and hasattr(lr_scheduler, "base_lrs"):
            lr_scheduler.base_lrs = [lr * self.cfg.lr_factor for lr in lr_scheduler.base_lrs]
        for group in optimizer.param_groups:
            group["lr"] *= self.cfg.lr_factor
        self.ctx.say(f"spike guard: step {state.global_step + 1} grad norm {norm:.3g} skipped; "
                     f"lr ×{self.cfg.lr_factor} ({self.skipped} skipped so far)")
        if self.consecutive > self.cfg.max_consecutive:
            raise MedpipeError(f"spike guard: {self.consecutive} consecutive updates skipped (last grad norm {norm:.3g}); "
                               f"lower stages.{self.ctx.name}.lr or check the data")


def callbacks(ctx: Any, p: Any) -> list:
    cbs: list = [ProgressCallback(ctx)]
    if p.spike_guard.enabled:
        cbs.append(SpikeGuard(p.spike_guard, ctx))
    return cbs


def train(trainer, ctx: Any) -> dict:
    """Train, resuming from the stage's last checkpoint if an earlier attempt was interrupted."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # ProgressCallback prints a compact line instead
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, SpikeGuard):
            cb.install(trainer)
    last = last_complete_checkpoint(ctx.output_dir / "checkpoints")
    if last:
        ctx.say(f"resuming from {Path(last).name}")
    with warnings.catch_warnings():
        # transformers 5 renamed gradient_* to activation_*; TRL still calls the old names every step
        warnings.filterwarnings("ignore", message=r".*is deprecated and will be removed in v6.*", category=FutureWarning)
        result = trainer.train(resume_from_checkpoint=last)
    metrics: dict = loss_metrics(trainer.state.log_history)
    metrics.update({k: v for k, v in result.metrics.items() if isinstance(v, (int, float))})
    metrics["steps"] = trainer.state.global_step
    metrics["tokens_seen"] = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)
    if last:
        metrics["resumed_from"] = Path(last).name
    metrics.update(distributed_facts(trainer, ctx))
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, SpikeGuard):
            metrics["spike_guard_skipped"] = cb.skipped
    return metrics


def distributed_facts(trainer, ctx: Any) -> dict:
    """World size and ZeRO stage actually in effect, and a digest of this rank's trainable weights
    (logged per rank, so data-parallel runs can be checked for identical replicas)."""
    import hashlib
    import os

    facts = {"world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    if trainer.is_deepspeed_enabled:
        facts["zero_stage"] = int(trainer.model_wrapped.zero_optimization_stage())
    model = trainer.accelerator.unwrap_model(trainer.model)
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    ctx.log.info("distributed: world_size=%d zero_stage=%s weights_sha256=%s", facts["world_size"],
                 facts.get("zero_stage", "none"), digest.hexdigest())
    facts["weights_sha256"] = digest.hexdigest()
    return facts


def last_complete_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest checkpoint that was written to the end (trainer_state.json is saved last), so a
    run killed while saving resumes from the previous one instead of failing on a torn checkpoint."""
    if not ckpt_dir.is_dir():
        return None
    found = [p for p in ckpt_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    for p in sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        if (p / "trainer_state.json").is_file():
            return str(p)
    return None


def loss_metrics(history: list[dict]) -> dict:
    losses = [h["loss"] for h in history if "loss" in h and math.isfinite(h["loss"])]
    out: dict = {}
    if losses:
        # mean of the first and of the last few logged losses: one batch alone is too noisy to compare
        k = max(1, min(3, len(losses) // 3))
        out["first_loss"], out["last_loss"] = sum(losses[:k]) / k, sum(losses[-k:]) / k
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    if evals:
        out["best_eval_loss"], out["last_eval_loss"] = min(evals), evals[-1]
    return out


def save_result(ctx: Any, trainer, tokenizer, params: Any, metrics: dict, **fields: Any) -> Artifact:
    """Save the trained model (LoRA: the adapter, merged once into `merged/` for the next stage
    and for inference; else the full model) and describe it. `fields`: typed Artifact fields."""
    adapter = getattr(params, "peft", None) is not None
    out = ctx.output_dir / ("adapter" if adapter else "model")
    trainer.save_model(str(out))
    trust = bool(ctx.model.get("trust_remote_code", False))
    merged = None
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(out))
        if adapter:
            merged = str(loader.merge_lora(out, ctx.input.model_path, out, ctx.output_dir / "merged", trust))
    trainer.accelerator.wait_for_everyone()
    if adapter:
        merged = str(ctx.output_dir / "merged")
    return Artifact(stage=ctx.name, kind=ctx.kind, format="adapter" if adapter else "full", model_path=str(out),
                    tokenizer_path=str(out), base_model_path=ctx.input.model_path if adapter else None,
                    metrics=metrics, trust_remote_code=trust, merged_path=merged, **fields)
