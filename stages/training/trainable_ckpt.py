"""Checkpoints that hold the trainable weights only, for trainers whose model has a frozen base but
is not a PEFT model (MedCare DA, C-Poly). Imported inside `run()` (torch/transformers).

Under DeepSpeed every checkpoint gets the engine's module state — the whole model, frozen base
included — and under ZeRO-2 the frozen parameters a second time (`frozen_param_fragments`): twice
~14 GB for a 7B base in bf16, per checkpoint. transformers spares PEFT models this: it passes
`exclude_frozen_parameters=True` when saving and loads the module state non-strictly. This mixin
does the same for any model: the frozen base is the stage's input model, which a resumed stage
loads again before the checkpoint's trainable weights and optimizer state are put back.
"""
from __future__ import annotations

import functools


def _frozen(module) -> set[str]:
    # remove_duplicate=False: a tied weight (lm_head = embeddings) under each of its names
    return {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}


def _drop_frozen(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: no frozen tensor (DeepSpeed's own exclusion misses tied weights)."""
    for name in _frozen(module):
        state_dict.pop(prefix + name, None)


def _frozen_may_be_missing(module, incompatible) -> None:
    """load_state_dict post-hook: a checkpoint without the frozen parameters is complete."""
    frozen = _frozen(module)
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in frozen]


class TrainableOnlyCheckpoints:
    """Mixin for a transformers Trainer subclass (put it first in the bases)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled:
            # the resume path calls engine.load_checkpoint(load_module_strict=True) for non-PEFT
            # models: let a module state without the frozen base load (strict about the rest)
            self.model.register_load_state_dict_post_hook(_frozen_may_be_missing)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_deepspeed_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        engine = self.model_wrapped
        engine.save_checkpoint = functools.partial(engine.save_checkpoint, exclude_frozen_parameters=True)
        hook = engine.module.register_state_dict_post_hook(_drop_frozen)
        try:
            super()._save_optimizer_and_scheduler(output_dir)
        finally:
            hook.remove()
            del engine.save_checkpoint  # the class's method again
