"""The loss-spike guard skips an exploding update, lowers the learning rate, and gives up after N."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

from medpipe.errors import MedpipeError
from medpipe.stages.training import common
from medpipe.stages.training.params import SpikeGuardParams
from medpipe.stages.models.tiny import ensure_tiny


class SpikyTrainer(Trainer):
    """Multiplies the loss of chosen optimizer steps by a huge factor (or NaN)."""

    spikes: dict = {}

    def compute_loss(self, model, inputs, return_outputs=False, **kw):
        loss = super().compute_loss(model, inputs, return_outputs, **kw)
        factor = self.spikes.get(self.state.global_step + 1)
        return loss * factor if factor is not None else loss


def run(tmp_path, spikes, max_consecutive=5):
    model = AutoModelForCausalLM.from_pretrained(ensure_tiny())
    data = Dataset.from_list([{"input_ids": [i % 50 + 5] * 16, "labels": [i % 50 + 5] * 16} for i in range(64)])
    ctx = SimpleNamespace(name="t", say=lambda m: None)
    guard = common.SpikeGuard(SpikeGuardParams(enabled=True, factor=10, window=20, lr_factor=0.5,
                                               max_consecutive=max_consecutive), ctx)
    snapshots = {}

    class Snap(common.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            snapshots[state.global_step] = model.lm_head.weight.detach().clone()

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4, learning_rate=1e-3,
                             use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", lr_scheduler_type="constant")
    trainer = SpikyTrainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator,
                           callbacks=[guard, Snap()])
    trainer.spikes = spikes
    guard.install(trainer)
    trainer.train()
    return guard, snapshots, trainer


def test_spike_is_skipped_and_lr_lowered(tmp_path):
    guard, snaps, trainer = run(tmp_path, {8: 1e6, 10: float("nan")})
    assert guard.skipped == 2
    assert torch.equal(snaps[7], snaps[8])  # the spiking update was not applied
    assert torch.equal(snaps[9], snaps[10])  # nor the NaN one
    assert not torch.equal(snaps[8], snaps[9])  # training went on
    assert math.isclose(trainer.optimizer.param_groups[0]["lr"], 1e-3 * 0.25, rel_tol=1e-6)
    assert all(math.isfinite(p.detach().sum().item()) for p in trainer.model.parameters())


def test_too_many_consecutive_spikes_fail_the_stage(tmp_path):
    with pytest.raises(MedpipeError, match="consecutive updates skipped"):
        run(tmp_path, {s: float("inf") for s in range(6, 13)}, max_consecutive=3)
