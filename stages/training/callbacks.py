"""Trainer callbacks every training kind uses: step progress + the log file the report reads, and
the loss-spike guard (two modes: skip the update, or IIMedGPT's halve-the-loss)."""
from __future__ import annotations

import functools
import math
import statistics
import time
from typing import Any

from transformers import TrainerCallback

from medpipe import history
from medpipe.errors import MedpipeError


class ProgressCallback(TrainerCallback):
    """Step progress on the terminal and every log line in the stage's history (`medpipe.history`)."""

    def __init__(self, ctx: Any):
        self.ctx, self.t0 = ctx, time.monotonic()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        history.append(self.ctx.output_dir, state.global_step, logs)
        shown = {k: v for k, v in logs.items() if isinstance(v, float) and k in
                 ("loss", "eval_loss", "learning_rate", "grad_norm", "rewards/accuracies", "rewards/margins",
                  "orth_loss", "ce_loss")}
        if shown:  # the trainer's end-of-training summary has none of these: the stage prints its own
            self.ctx.progress(state.global_step, state.max_steps, **shown, **self._speed(state))

    def on_train_begin(self, args, state, control, **kwargs):
        # tokens/s of this attempt's training: not model loading, not the tokens of a resumed checkpoint
        self.t0, self.tokens0 = time.monotonic(), int(getattr(state, "num_input_tokens_seen", 0) or 0)

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # the progress display moves every step, the log lines above stay per log
            self.ctx.progress(state.global_step, state.max_steps, **self._speed(state))

    def _speed(self, state) -> dict:
        tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0) - getattr(self, "tokens0", 0)
        elapsed = time.monotonic() - self.t0
        return {"tokens_per_s": tokens / elapsed} if tokens and elapsed > 0 else {}


class SpikeGuard(TrainerCallback):
    """Guards updates whose gradient norm is non-finite or spikes (> factor × the median of the last
    `window` norms), and lowers the learning rate by `lr_factor` at every such step, so the lr
    decreases progressively with each explosion.

    mode `skip`: the update is not applied. mode `halve_loss` (IIMedGPT §4.1, "halve the loss in the
    event of gradient explosion and decrement the learning rate progressively"): the update is
    applied with the gradient × `loss_factor` (0.5) — backward is linear in the loss, so this is the
    update of the halved loss; a non-finite gradient stays non-finite when halved, so that one is
    skipped. The paper gives no threshold: the spike test is medpipe's.

    The pre-clipping norm is read by wrapping the trainer's `_get_grad_norm`, and the update is
    skipped by wrapping `optimizer.step` (see `install`). Under DeepSpeed the engine steps inside
    backward, so there the guard counts and lowers the lr but neither skips nor halves: the skip
    is DeepSpeed's own (fp16 overflow handling)."""

    def __init__(self, cfg: Any, ctx: Any):
        self.cfg, self.ctx = cfg, ctx
        self.norms: list[float] = []
        self.last_norm: float | None = None
        self.skip = False
        self.consecutive = 0
        self.skipped = 0
        self.halved = 0

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
        self.consecutive += 1
        if self.cfg.mode == "halve_loss" and math.isfinite(norm):
            self.halved += 1
            for param in model.parameters():
                if param.grad is not None:
                    param.grad.mul_(self.cfg.loss_factor)
            action = f"loss ×{self.cfg.loss_factor}"
        else:
            self.skip = True
            self.skipped += 1
            model.zero_grad(set_to_none=True)
            action = "skipped"
        if lr_scheduler is not None and hasattr(lr_scheduler, "base_lrs"):
            lr_scheduler.base_lrs = [lr * self.cfg.lr_factor for lr in lr_scheduler.base_lrs]
        for group in optimizer.param_groups:
            group["lr"] *= self.cfg.lr_factor
        self.ctx.say(f"spike guard: step {state.global_step + 1} grad norm {norm:.3g} {action}; "
                     f"lr ×{self.cfg.lr_factor} ({self.skipped} skipped, {self.halved} halved so far)")
        if self.consecutive > self.cfg.max_consecutive:
            raise MedpipeError(f"spike guard: {self.consecutive} consecutive updates {'skipped' if self.cfg.mode == 'skip' else 'guarded'} (last grad norm {norm:.3g}); "
                               f"lower stages.{self.ctx.name}.lr or check the data")


def callbacks(ctx: Any, p: Any) -> list:
    cbs: list = [ProgressCallback(ctx)]
    if p.spike_guard.enabled:
        cbs.append(SpikeGuard(p.spike_guard, ctx))
    return cbs
