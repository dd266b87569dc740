"""The training loop around a trainer: the stage's input model (seeded before any adapter is
built), train with resume from the last complete checkpoint (`medpipe.history` owns that rule and
the stage's log history), loss and distributed facts, and the saved result. Imported only inside
`run()` (it imports torch and transformers)."""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

from medpipe import history
from medpipe.artifact import Artifact
from medpipe.stages.models import loader
from medpipe.stages.training.callbacks import SpikeGuard


def data_cache_dir(ctx: Any) -> Path:
    """Where tokenised/packed data is cached (data.cache_dir, default $MEDPIPE_CACHE/data): a stage
    rerun with a changed hyperparameter does not re-tokenise."""
    from medpipe.paths import cache_root

    return Path(ctx.data.get("cache_dir") or cache_root() / "data").expanduser()


def load_tokenizer(ctx: Any, path: str | None = None):
    return loader.load_tokenizer(path or ctx.input.tokenizer_path, bool(ctx.model.get("trust_remote_code", False)))


def seed(ctx: Any) -> None:
    """Seed every generator (python, numpy, torch) with the run's seed. Called after the input model
    is loaded and before any module with random init (LoRA, MedCare/C-Poly layers, routers) is
    built, so the same stage key gives the same initial adapter — and so the same weights — in any
    process, whatever ran in it before (the trainer seeds again only when it is constructed)."""
    from transformers import set_seed

    set_seed(int(ctx.seed))


def load_model(ctx: Any, params: Any, path: str | None = None):
    """The stage's input model for training (dtype policy: medpipe.stages.models.loader), then
    the generators seeded (`seed`): what the caller builds on it next is reproducible."""
    dtype = loader.training_dtype(ctx.model.get("dtype"), params, deepspeed_config=getattr(ctx, "deepspeed_config", None))
    import torch

    if torch.cuda.is_available():  # the stage's own peak (distributed_facts), not the driver's earlier stages'
        torch.cuda.reset_peak_memory_stats()
    attention = pick_attention(ctx.model, params)
    if attention:
        ctx.log.info("attention: %s", attention)
    if zero3(ctx):  # transformers loads under deepspeed.zero.Init, which needs DeepSpeed's process group first
        import deepspeed

        deepspeed.init_distributed()
    model = loader.load_causal_lm(path or ctx.input.model_path, dtype=dtype,
                                  trust_remote_code=bool(ctx.model.get("trust_remote_code", False)),
                                  attn_implementation=attention)
    if getattr(params, "gradient_checkpointing", False):
        model.config.use_cache = False
        # a frozen embedding's output needs grad, or checkpointed layers over a frozen base (LoRA,
        # MedCare, C-Poly) give their adapters no gradient; the hook stays on the base under PEFT
        model.enable_input_require_grads()
    seed(ctx)
    return model


apply_lora = loader.apply_lora


def pick_attention(model_opts: dict, params: Any) -> str | None:
    """The attention kernel: `model.attn_implementation` when the recipe sets one (sdpa, eager,
    flash_attention_2, a kernels-hub id); else flash-attention 2 for packed (padding-free) SFT on a
    CUDA GPU in bf16/fp16 when the flash-attn package is installed — sdpa has no varlen kernel, so a
    packed row of N conversations costs a full (micro × length)² attention, flash-attn's varlen path
    attends within each conversation only; else None (transformers' default, sdpa)."""
    chosen = model_opts.get("attn_implementation")
    if chosen:
        return chosen
    packing = getattr(params, "packing", False)
    packed = packing is True or (packing is None and not model_opts.get("trust_remote_code", False))
    if not packed:
        return None
    import torch
    from transformers.utils import is_flash_attn_2_available

    from medpipe.stages.training.args import use_bf16

    half = use_bf16(params) or getattr(params, "precision", "auto") == "fp16"
    if torch.cuda.is_available() and half and is_flash_attn_2_available():
        return "flash_attention_2"
    return None


def zero3(ctx: Any) -> bool:
    """Whether this stage runs under DeepSpeed ZeRO-3 (parameters partitioned over the ranks)."""
    import json

    path = ctx.deepspeed_config
    return bool(path) and json.loads(Path(path).read_text()).get("zero_optimization", {}).get("stage") == 3


def train(trainer, ctx: Any) -> dict:
    """Train, resuming from the stage's last checkpoint if an earlier attempt was interrupted."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # ProgressCallback prints a compact line instead
    guards = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SpikeGuard)]
    for cb in guards:
        cb.install(trainer)
    last = history.last_complete_checkpoint(ctx.output_dir / "checkpoints", say=ctx.say)
    if last:
        ctx.say(f"resuming from {Path(last).name}")
    if trainer.is_world_process_zero():  # the lines an abandoned attempt logged past `last` go, once
        history.trim(ctx.output_dir, history.checkpoint_step(last) if last else 0)
    with warnings.catch_warnings():
        # transformers 5 renamed gradient_* to activation_*; TRL still calls the old names every step
        warnings.filterwarnings("ignore", message=r".*is deprecated and will be removed in v6.*", category=FutureWarning)
        result = trainer.train(resume_from_checkpoint=last)
    metrics: dict = loss_metrics(trainer.state.log_history)
    metrics.update({k: v for k, v in result.metrics.items() if isinstance(v, (int, float))})
    metrics["steps"] = trainer.state.global_step
    metrics["tokens_seen"] = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)
    args = trainer.args
    metrics["global_batch"] = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    if last:
        metrics["resumed_from"] = Path(last).name
    if last and trainer.is_world_process_zero():
        # the trainer's train_loss covers this attempt's steps only (0.0 when it resumed at the end)
        whole = history.mean_loss(ctx.output_dir)
        if whole is None:
            metrics.pop("train_loss", None)
        else:
            metrics["train_loss"] = whole
    metrics.update(distributed_facts(trainer, ctx))
    for cb in guards:
        metrics["spike_guard_skipped"] = cb.skipped
        if cb.cfg.mode == "halve_loss":
            metrics["spike_guard_halved"] = cb.halved
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
    import torch

    if torch.cuda.is_available():
        facts["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    facts["activation_checkpointing"] = bool(getattr(model, "is_activation_checkpointing",
                                                 getattr(model, "is_gradient_checkpointing", False)))
    digest = hashlib.sha256()
    trained = [(n, p) for n, p in sorted(model.named_parameters()) if p.requires_grad]
    with _gathered([p for _, p in trained], facts.get("zero_stage") == 3):  # ZeRO-3: each rank holds a slice
        for name, param in trained:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    ctx.log.info("distributed: world_size=%d zero_stage=%s weights_sha256=%s", facts["world_size"],
                 facts.get("zero_stage", "none"), digest.hexdigest())
    facts["weights_sha256"] = digest.hexdigest()
    return facts


def _gathered(params: list, partitioned: bool):
    """The whole tensors of ZeRO-3-partitioned parameters for the duration of the block."""
    import contextlib

    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _plain_loading():
    """Models loaded in the block are whole, not ZeRO-3-partitioned: transformers partitions every
    from_pretrained while the trainer's ZeRO-3 config is registered (a collective over all ranks)."""
    import contextlib

    from transformers.integrations import deepspeed as hf_deepspeed

    @contextlib.contextmanager
    def unregistered():
        ref = hf_deepspeed._hf_deepspeed_config_weak_ref
        hf_deepspeed.unset_hf_deepspeed_config()
        try:
            yield
        finally:
            hf_deepspeed._hf_deepspeed_config_weak_ref = ref

    return unregistered()


def loss_metrics(log: list[dict]) -> dict:
    losses = [h["loss"] for h in log if "loss" in h and math.isfinite(h["loss"])]
    out: dict = {}
    if losses:
        # mean of the first and of the last few logged losses: one batch alone is too noisy to compare
        k = max(1, min(3, len(losses) // 3))
        out["first_loss"], out["last_loss"] = sum(losses[:k]) / k, sum(losses[-k:]) / k
    evals = [h["eval_loss"] for h in log if "eval_loss" in h]
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
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(out))
        if adapter:
            with _plain_loading():  # rank 0 alone: ZeRO-3's partitioned loading would wait for the others
                loader.merge_lora(out, ctx.input.model_path, out, ctx.output_dir / "merged", trust)
    trainer.accelerator.wait_for_everyone()
    merged = str(ctx.output_dir / "merged") if adapter else None
    return Artifact(stage=ctx.name, kind=ctx.kind, format="adapter" if adapter else "full", model_path=str(out),
                    tokenizer_path=str(out), base_model_path=ctx.input.model_path if adapter else None,
                    metrics=metrics, trust_remote_code=trust, merged_path=merged, **fields)
