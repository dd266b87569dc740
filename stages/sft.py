"""`sft` — supervised fine-tuning on chat data with the loss on assistant tokens only."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from medpipe.stages.training.params import TrainParams


@dataclass
class SFTParams(TrainParams):
    lr: float = 2e-5
    epochs: float = 3.0
    warmup: float = 0.05
    weight_decay: float = 0.05
    max_length: int = 2048
    chat_template: Optional[str] = None  # Jinja template for tokenizers that have none


class SFTStage:
    """Supervised fine-tuning: prompt/response or multi-turn chat, loss on assistant turns, LoRA or full."""

    Params = SFTParams

    def check(self, params: SFTParams, base: Any, data_opts: dict) -> list[str]:
        from medpipe.stages.training.chat_data import check_chat_data

        return check_chat_data(params, base, data_opts)

    def run(self, ctx: Any):
        from trl import SFTConfig, SFTTrainer

        from medpipe.data import load_records
        from medpipe.stages.training import common
        from medpipe.stages.training.chat_data import encode_dataset
        from medpipe.stages.training.params import data_options

        p: SFTParams = ctx.params
        tok = common.load_tokenizer(ctx)
        if p.chat_template:
            tok.chat_template = p.chat_template
        loaded = load_records(p.data, "chat", heldout=p.heldout, **data_options(p, ctx.data))
        cache = common.data_cache_dir(ctx)
        train_ds = encode_dataset(loaded.records, tok, p.max_length, cache)
        eval_ds = encode_dataset(loaded.heldout, tok, p.max_length, cache) if loaded.heldout else None
        ctx.say(f"{len(train_ds)} training conversations" + (f", {len(eval_ds)} held out" if eval_ds else ""))
        model = common.apply_lora(common.load_model(ctx, p), p.peft)
        args = SFTConfig(**common.training_kwargs(ctx, p), max_length=p.max_length, packing=False,
                         dataset_num_proc=p.num_proc)
        trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                             processing_class=tok, callbacks=common.callbacks(ctx, p))
        metrics = common.train(trainer, ctx)
        multi = sum(1 for r in loaded.records if sum(m["role"] == "assistant" for m in r["messages"]) > 1)
        metrics.update(conversations=len(train_ds), conversations_multi_turn=multi,
                       heldout=len(eval_ds) if eval_ds else 0)
        return common.save_result(ctx, trainer, tok, p, metrics)
