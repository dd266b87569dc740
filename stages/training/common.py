"""Re-exports for stage kinds written against the old single `common` module (cpt, sft): the code
lives in args (trainer arguments), callbacks (progress, spike guard) and loop (model, train, save)."""
from __future__ import annotations

from medpipe.stages.training.args import training_kwargs, use_bf16  # noqa: F401
from medpipe.stages.training.callbacks import ProgressCallback, SpikeGuard, callbacks  # noqa: F401
from medpipe.stages.training.loop import (apply_lora, data_cache_dir, distributed_facts, last_complete_checkpoint,  # noqa: F401
                                          load_model, load_tokenizer, loss_metrics, save_result, train)
