"""Trainer arguments from a stage's params: the TrainingArguments (and TRL config) fields every
training kind shares, and the batch layout (global batch = micro batch × accumulation × ranks)."""
from __future__ import annotations

from typing import Any

from medpipe.errors import ConfigError
from medpipe.stagekind import process_world_size
from medpipe.stages.models import loader
from medpipe.stages.training import tracking  # report_to / run_name from the driver's trackers


def batch_layout(ctx: Any, p: Any) -> tuple[int, int]:
    """(per-device micro batch, gradient accumulation steps) for this process group, checked again
    on every rank: the driver checked the launcher's world size, but a hand-started rank may differ."""
    try:
        return p.batch_layout(process_world_size())
    except ValueError as e:
        raise ConfigError(f"stages.{ctx.name}: {e}") from None


def use_bf16(params: Any) -> bool:
    return loader.use_bf16(getattr(params, "precision", "auto"))


def training_kwargs(ctx: Any, p: Any) -> dict:
    """TrainingArguments (and TRL config) fields from the stage params; one place for all stages."""
    import torch

    cuda = torch.cuda.is_available()
    micro, accum = batch_layout(ctx, p)
    kw = dict(
        output_dir=str(ctx.output_dir / "checkpoints"),
        learning_rate=p.lr, num_train_epochs=p.epochs, max_steps=p.max_steps,
        per_device_train_batch_size=micro, per_device_eval_batch_size=micro,
        gradient_accumulation_steps=accum, warmup_steps=p.warmup, weight_decay=p.weight_decay,
        lr_scheduler_type=p.scheduler, lr_scheduler_kwargs=dict(p.scheduler_kwargs),
        adam_beta1=p.adam_beta1, adam_beta2=p.adam_beta2, max_grad_norm=p.max_grad_norm,
        logging_steps=p.logging_steps, save_strategy="steps", save_steps=p.save_steps,
        save_total_limit=p.save_total_limit, **tracking.report_kwargs(ctx), seed=ctx.seed, data_seed=ctx.seed,
        use_cpu=not cuda, bf16=use_bf16(p), fp16=p.precision == "fp16",
        deepspeed=ctx.deepspeed_config,
        disable_tqdm=True, dataloader_num_workers=0, include_num_input_tokens_seen="non_padding",
    )
    kw.update(checkpointing_kwargs(p.gradient_checkpointing))
    if not cuda and process_world_size() > 1:
        kw["ddp_backend"] = "gloo"
    if p.heldout > 0:
        steps = p.eval_steps or p.save_steps
        kw.update(eval_strategy="steps", eval_steps=steps, save_steps=steps)
        if p.keep_best:
            kw.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
    return kw


def checkpointing_kwargs(on: bool) -> dict:
    """Activation (gradient) checkpointing, non-reentrant: the reentrant variant drops the gradient
    of a frozen base whose inputs do not require grad (PEFT LoRA) and cannot run under DDP's unused-
    parameter search. transformers >= 5.20 names it activation_checkpointing (gradient_* kept as a
    deprecated alias); earlier 5.x only know gradient_checkpointing."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    if not on:
        return {name: False}
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}
