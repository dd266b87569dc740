"""The loss-spike guard: mode skip drops an exploding update, lowers the learning rate and gives up
after N; mode halve_loss (IIMedGPT) applies the update of the halved loss and lowers the lr."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments, default_data_collator

from medpipe.errors import MedpipeError
from medpipe.stages.models.tiny import ensure_tiny
from medpipe.stages.training.callbacks import SpikeGuard
from medpipe.stages.training.params import SpikeGuardParams


class SpikyTrainer(Trainer):
    """Multiplies the loss of chosen optimizer steps by a factor (huge, or NaN)."""

    spikes: dict = {}

    def compute_loss(self, model, inputs, return_outputs=False, **kw):
        loss = super().compute_loss(model, inputs, return_outputs, **kw)
        factor = self.spikes.get(self.state.global_step + 1)
        return loss * factor if factor is not None else loss


def run(tmp_path, spikes, guard_cfg: SpikeGuardParams | None, max_grad_norm: float = 1.0):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(ensure_tiny())
    data = Dataset.from_list([{"input_ids": [i % 50 + 5] * 16, "labels": [i % 50 + 5] * 16} for i in range(64)])
    snapshots = {}

    class Snap(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            snapshots[state.global_step] = model.lm_head.weight.detach().clone()

    guard = SpikeGuard(guard_cfg, SimpleNamespace(name="t", say=lambda m: None)) if guard_cfg else None
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4, learning_rate=1e-3,
                             use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", lr_scheduler_type="constant",
                             max_grad_norm=max_grad_norm, seed=0, data_seed=0)
    trainer = SpikyTrainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator,
                           callbacks=[cb for cb in (guard, Snap()) if cb])
    trainer.spikes = spikes
    if guard:
        guard.install(trainer)
    trainer.train()
    return guard, snapshots, trainer


def skip_cfg(**kw) -> SpikeGuardParams:
    return SpikeGuardParams(**{"enabled": True, "factor": 10, "window": 20, "lr_factor": 0.5, **kw})


def test_spike_is_skipped_and_lr_lowered(tmp_path):
    guard, snaps, trainer = run(tmp_path, {8: 1e6, 10: float("nan")}, skip_cfg())
    assert guard.skipped == 2
    assert torch.equal(snaps[7], snaps[8])  # the spiking update was not applied
    assert torch.equal(snaps[9], snaps[10])  # nor the NaN one
    assert not torch.equal(snaps[8], snaps[9])  # training went on
    assert math.isclose(trainer.optimizer.param_groups[0]["lr"], 1e-3 * 0.25, rel_tol=1e-6)
    assert all(math.isfinite(p.detach().sum().item()) for p in trainer.model.parameters())


def test_too_many_consecutive_spikes_fail_the_stage(tmp_path):
    with pytest.raises(MedpipeError, match="4 consecutive updates skipped"):
        run(tmp_path, {s: float("inf") for s in range(6, 13)}, skip_cfg(max_consecutive=3))


def test_halve_loss_applies_the_update_of_the_halved_loss(tmp_path):
    # without clipping, the guarded step 8 (loss × 1e4) must update exactly as an unguarded run whose
    # step-8 loss is × 0.5e4; lr_factor 1 keeps both runs on the same lr (the lr is checked below)
    cfg = skip_cfg(mode="halve_loss", lr_factor=1.0)
    guard, snaps, _ = run(tmp_path / "a", {8: 1e4, 10: float("nan")}, cfg, max_grad_norm=0.0)
    _, want, _ = run(tmp_path / "b", {8: 0.5e4}, None, max_grad_norm=0.0)
    assert (guard.halved, guard.skipped) == (1, 1)  # the NaN step cannot be halved: skipped
    assert not torch.equal(snaps[7], snaps[8])  # the spiking update WAS applied ...
    assert torch.equal(snaps[8], want[8])  # ... as the update of the halved loss
    assert torch.equal(snaps[9], snaps[10])


def test_halve_loss_lowers_the_lr_at_every_explosion(tmp_path):
    guard, _, trainer = run(tmp_path, {6: 1e6, 9: 1e6}, skip_cfg(mode="halve_loss", lr_factor=0.8))
    assert guard.halved == 2
    assert math.isclose(trainer.optimizer.param_groups[0]["lr"], 1e-3 * 0.8 * 0.8, rel_tol=1e-6)
