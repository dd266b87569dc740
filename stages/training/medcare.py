"""Training pieces shared by the MedCare stages (imported inside `run()`: it imports torch/TRL).

`MedCareTrainer` adds MedCare's extra loss terms (DA's λ·L_orth, MKA's optional balance loss) to
the cross-entropy so that they are scaled for gradient accumulation exactly like the CE: when the
trainer normalises CE by the accumulated token count (no later division), each micro-batch adds
term / accumulation_steps; otherwise the trainer divides the whole sum later. Either way one
optimizer step sees CE + λ·L_orth, whatever the accumulation (the published code multiplied the
term's weight by the accumulation steps). CE and the extra terms are logged separately.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers.trainer_utils import _is_peft_model  # the test the Trainer itself uses
from trl import SFTTrainer

from medpipe.stages.adapters import medcare, medcare_io
from medpipe.stages.training.trainable_ckpt import TrainableOnlyCheckpoints


FFN_ADAPTER_DIR = "medcare_adapter"


def load_adapter_state(model, path) -> None:
    """Copy a save_medcare state (strict: every adapter tensor, nothing else) into `model`."""
    from safetensors.torch import load_file

    medcare.load_into(medcare.adapter_state_dict(model), load_file(str(path)), str(path))


class MedCareTrainer(TrainableOnlyCheckpoints, SFTTrainer):
    def __init__(self, *args, orth_lambda: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.orth_lambda = orth_lambda
        self._balance_on = any(m.has_na and m.cfg.balance_coef > 0 for _, m in medcare.medcare_modules(self.model))
        self._sums: dict = {}  # name -> float64 tensor on the loss's device
        self._n = 0

    def _ce_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._balance_on:
            medcare.set_token_mask(model, inputs.get("attention_mask") if model.training else None)
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss, rest = (out[0], out[1:]) if return_outputs else (out, ())
        if not model.training:
            return out
        scale = 1.0 / self.current_gradient_accumulation_steps if self._ce_is_scaled_for_ga(num_items_in_batch) else 1.0
        extra = {}
        if self.orth_lambda:
            extra["orth_loss"] = medcare.orthogonal_loss(model)
        balance = medcare.balance_loss(model)
        if balance is not None:
            extra["balance_loss"] = balance
        self._record("ce_loss", loss.detach().double() / scale)
        total = loss
        for name, value in extra.items():
            weight = self.orth_lambda if name == "orth_loss" else 1.0
            total = total + weight * scale * value.to(loss.dtype)
            self._record(name, value.detach().double())
        self._n += 1
        return (total, *rest) if return_outputs else total

    # Trainer checkpoints of a PeftModel hold only PEFT's attention LoRA: the FFN adapters (KA, NA
    # experts, routers, Align) are saved beside it and loaded back on resume, so an interrupted
    # MKA/DA resumes with every adapter (the published code lost the routers mid-MKA). DA's model
    # is no PeftModel: its checkpoints hold the adapters alone, not a copy of the frozen base.
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if _is_peft_model(self.model):
            super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save:  # one writer (every rank comes here under DeepSpeed)
            return
        if not _is_peft_model(self.model):  # DA: the tokenizer and arguments beside the adapters, no base copy
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        medcare_io.save_medcare(self.accelerator.unwrap_model(self.model), Path(output_dir) / FFN_ADAPTER_DIR)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        saved = Path(resume_from_checkpoint) / FFN_ADAPTER_DIR / medcare.ADAPTER_FILE
        if _is_peft_model(model or self.model) or not saved.is_file():
            super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        if saved.is_file():
            load_adapter_state(self.accelerator.unwrap_model(model or self.model), saved)

    def _load_best_model(self) -> None:
        saved = Path(self.state.best_model_checkpoint) / FFN_ADAPTER_DIR / medcare.ADAPTER_FILE
        if _is_peft_model(self.model) or self.is_deepspeed_enabled or not saved.is_file():
            return super()._load_best_model()
        load_adapter_state(self.accelerator.unwrap_model(self.model), saved)

    def _record(self, name: str, value) -> None:
        # summed on the device in float64 (what python floats held before): reading a value
        # (.item()) every micro-step would make the host wait for the GPU each time; log() reads
        # the sums once per logging step, where the trainer reads its own loss anyway
        self._sums[name] = value if name not in self._sums else self._sums[name] + value

    def log(self, logs: dict, *args: Any, **kwargs: Any) -> None:
        if self._n and "loss" in logs:
            for name, total in self._sums.items():
                logs[name] = (total / self._n).item()
            self._sums, self._n = {}, 0
        super().log(logs, *args, **kwargs)


def first_last(history: list[dict], key: str) -> dict:
    values = [h[key] for h in history if key in h]
    if not values:
        return {}
    k = max(1, min(3, len(values) // 3))
    return {f"first_{key}": sum(values[:k]) / k, f"last_{key}": sum(values[-k:]) / k}
