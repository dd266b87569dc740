"""`sft` — supervised fine-tuning on chat data with the loss on assistant tokens only."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from medpipe.params import param
from medpipe.stagekind import StageKind
from medpipe.stages.training.params import TrainParams

OVERLENGTH = ("truncate", "drop", "error")


@dataclass
class SFTParams(TrainParams):
    changed_defaults = {"epochs": 3.0, "warmup": 0.05, "weight_decay": 0.05}
    max_length: int = param(2048, "tokens per conversation")
    max_prompt_length: Optional[int] = param(None, "each prompt run (the text before an answer) cut to this many tokens "
                                                   "(Qilin-Med: 256); it loses the end of its user text, the template's "
                                                   "turn markers stay; null = no separate limit")
    max_response_length: Optional[int] = param(None, "each answer cut to this many tokens (its end goes; Qilin-Med: 256); "
                                                     "null = no separate limit")
    overlength: Optional[str] = param(None, "a conversation still longer than max_length: truncate (keep its start; "
                                            "counted) | drop (counted) | error; null: the recipe's data.overlength, "
                                            "else truncate", choices=(*OVERLENGTH, None))
    chat_template: Optional[str] = param(None, "Jinja template for tokenizers that have none")
    # packing (tests/test_sft_encoding.py: packed per-conversation loss == alone). null = auto: on for
    # models built by transformers itself (sdpa / eager / flash attention), off for trust_remote_code
    # models, whose own attention code may ignore packed position ids. The paper recipes pin false:
    # packed, `batch_size` counts rows of max_length tokens, not conversations, so the papers'
    # global batch sizes (in conversations) would no longer hold.
    packing: Optional[bool] = param(None, "padding-free packing: conversations packed best-fit into max_length rows, "
                                           "position ids restarting per conversation, no attention across them, loss "
                                           "masks kept; null = auto (on for transformers' own attention)")

    def _rules(self):
        return super()._rules() + [
            ("max_prompt_length", self.max_prompt_length is None or self.max_prompt_length >= 1, ">= 1 or null"),
            ("max_response_length", self.max_response_length is None or self.max_response_length >= 1, ">= 1 or null")]


def packing_on(p: SFTParams, model_opts: dict) -> bool:
    """Explicit packing: true/false; null: on unless the model runs its own (remote) modeling code."""
    if p.packing is not None:
        return bool(p.packing)
    return not bool(model_opts.get("trust_remote_code", False))


class SFTStage(StageKind):
    """Supervised fine-tuning: prompt/response or multi-turn chat, loss on assistant turns, LoRA or full."""

    Params = SFTParams

    def check(self, params: SFTParams, base: Any, data_opts: dict) -> list[str]:
        from medpipe.stages.training.chat_data import check_chat_data

        return check_chat_data(params, base, data_opts)

    def run(self, ctx: Any):
        from trl import SFTConfig, SFTTrainer

        from medpipe.stages.training.args import training_kwargs
        from medpipe.stages.training.callbacks import callbacks
        from medpipe.stages.training.loop import (apply_lora, data_cache_dir, load_model, load_tokenizer, save_result,
                                                  train)
        from medpipe.stages.training.chat_data import prepare_chat_data

        p: SFTParams = ctx.params
        tok = load_tokenizer(ctx)
        if p.chat_template:
            tok.chat_template = p.chat_template
        packing = packing_on(p, ctx.model)
        # unpacked: the encoder's output + labels is what the trainer trains on, TRL's preparation is
        # skipped (chat_data.with_labels says why); packed: TRL packs in its preparation
        args = SFTConfig(**training_kwargs(ctx, p), max_length=p.max_length, packing=packing,
                         packing_strategy="bfd", padding_free=packing, dataset_num_proc=p.num_proc,
                         dataset_kwargs=None if packing else {"skip_prepare_dataset": True})
        # prepared once per node: local rank 0 encodes (or finds the cache), the others wait, then memory-map it
        with args.main_process_first(local=True, desc="SFT data"):
            data = prepare_chat_data(p, ctx.data, tok, data_cache_dir(ctx), log=ctx.log)
        train_ds, eval_ds = data.train, data.heldout
        if not packing:
            from medpipe.stages.training.chat_data import with_labels

            with args.main_process_first(local=True, desc="SFT labels"):
                train_ds, eval_ds = with_labels(train_ds), with_labels(eval_ds)
        ctx.say(f"{len(train_ds)} training conversations" + (f", {len(eval_ds)} held out" if eval_ds else "")
                + (" (packed, padding-free)" if packing else ""))
        model = apply_lora(load_model(ctx, p), p.peft)
        trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                             processing_class=tok, callbacks=callbacks(ctx, p))
        metrics = train(trainer, ctx)
        metrics.update(conversations=len(train_ds), conversations_multi_turn=data.stats.multi_turn,
                       heldout=len(eval_ds) if eval_ds else 0, prompt_cut=data.stats.prompt_cut,
                       response_cut=data.stats.response_cut, truncated=data.stats.truncated,
                       overlength_dropped=data.stats.overlength_dropped, packed=packing)
        return save_result(ctx, trainer, tok, p, metrics)
