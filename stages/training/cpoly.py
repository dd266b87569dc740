"""C-Poly training pieces (imported inside `run()`: torch/transformers): the trainer that saves and
loads a CPolyModel as its adapter, and the collator that carries each example's task index."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer

from medpipe.stages.adapters.cpoly import WEIGHTS_NAME, CPolyModel, save_cpoly
from medpipe.stages.training.trainable_ckpt import TrainableOnlyCheckpoints

PARAM_NAMES = ("cpoly_A", "cpoly_B", "cpoly_logits", "cpoly_task_w")


def adapter_tensors_of(state_dict: dict) -> dict:
    """Adapter tensors of a CPolyModel state dict, keyed as save_cpoly keys them (inner layer paths)."""
    out = {}
    for k, v in state_dict.items():
        if k.rsplit(".", 1)[-1] in PARAM_NAMES:
            out[k[len("model."):] if k.startswith("model.") else k] = v
    return out


def load_adapter_tensors(model: CPolyModel, directory: str | Path) -> None:
    """Copy the tensors of a saved C-Poly adapter into an existing CPolyModel (resume, best model)."""
    tensors = load_file(str(Path(directory) / WEIGHTS_NAME))
    if set(tensors) != set(model.adapter_state_dict()):
        raise ValueError(f"{directory}: C-Poly checkpoint tensors do not match the model")
    with torch.no_grad():
        for name, layer in model.cpoly_layers().items():
            for pname in PARAM_NAMES:
                param = getattr(layer, pname)
                if param is not None:
                    param.copy_(tensors[f"{name}.{pname}"].to(param.dtype))


class CPolyTrainer(TrainableOnlyCheckpoints, Trainer):
    """transformers.Trainer that saves/loads a CPolyModel as its adapter (cpoly_adapter.safetensors +
    cpoly_config.json) in checkpoints and the final save, instead of a full state dict; PEFT and
    plain models go through the stock paths. Under DeepSpeed the engine's part of a checkpoint holds
    the trainable weights only (TrainableOnlyCheckpoints)."""

    def _cpoly(self) -> CPolyModel | None:
        model = self.accelerator.unwrap_model(self.model)
        return model if isinstance(model, CPolyModel) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        cm = self._cpoly()
        if cm is None:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        save_cpoly(cm, output_dir)  # config + the live tensors
        if state_dict is not None:  # DeepSpeed: the engine's (possibly gathered) weights win
            tensors = adapter_tensors_of(state_dict)
            if tensors and set(tensors) == set(cm.adapter_state_dict()):
                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                          os.path.join(output_dir, WEIGHTS_NAME), metadata={"format": "pt"})
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        cm = self._cpoly()
        if cm is None or not os.path.isfile(os.path.join(resume_from_checkpoint, WEIGHTS_NAME)):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapter_tensors(cm, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        cm = self._cpoly()
        best = self.state.best_model_checkpoint
        if cm is None or self.is_deepspeed_enabled or not os.path.isfile(os.path.join(best, WEIGHTS_NAME)):
            return super()._load_best_model()
        load_adapter_tensors(cm, best)


class TaskCollator:
    """Right-pads input_ids/labels, adds attention_mask, and (C-Poly) the per-example `task_ids`.
    Counts batches holding more than one task (mixed-task batches)."""

    def __init__(self, pad_id: int, with_task_ids: bool):
        self.pad_id, self.with_task_ids = pad_id, with_task_ids
        self.batches = 0
        self.mixed = 0

    def __call__(self, features: list[dict]) -> dict:
        n, L = len(features), max(len(f["input_ids"]) for f in features)
        ids = torch.full((n, L), self.pad_id, dtype=torch.long)
        labels = torch.full((n, L), -100, dtype=torch.long)
        mask = torch.zeros((n, L), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.tensor(f["input_ids"])
            labels[i, :k] = torch.tensor(f["labels"])
            mask[i, :k] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        tids = [int(f["task_id"]) for f in features]
        self.batches += 1
        self.mixed += len(set(tids)) > 1
        if self.with_task_ids:
            batch["task_ids"] = torch.tensor(tids, dtype=torch.long)
        return batch
