"""`sft` — supervised fine-tuning on chat data with the loss on assistant tokens only."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from medpipe.params import param
from medpipe.stages.training.sequence import ChatTrainingKind
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


class SFTStage(ChatTrainingKind):
    """Supervised fine-tuning: prompt/response or multi-turn chat, loss on assistant turns, LoRA or full."""

    Params = SFTParams
    data_desc = "SFT data"

    def config_options(self, ctx: Any) -> dict:
        # unpacked: the encoder's output + labels is what the trainer trains on, TRL's preparation is
        # skipped (chat_data.with_labels says why); packed: TRL packs in its preparation
        packing = packing_on(ctx.params, ctx.model)
        return dict(packing=packing, packing_strategy="bfd", padding_free=packing, dataset_num_proc=ctx.params.num_proc,
                    dataset_kwargs=None if packing else {"skip_prepare_dataset": True})

    def data(self, ctx: Any, tok: Any, args: Any):
        data = super().data(ctx, tok, args)
        data.packed = packing_on(ctx.params, ctx.model)
        if not data.packed:
            from medpipe.stages.training.chat_data import with_labels

            with args.main_process_first(local=True, desc="SFT labels"):
                data.train, data.heldout = with_labels(data.train), with_labels(data.heldout)
        ctx.say(f"{len(data.train)} training conversations" + (f", {len(data.heldout)} held out" if data.heldout else "")
                + (" (packed, padding-free)" if data.packed else ""))
        return data

    def metrics(self, ctx: Any, trainer: Any, data: Any) -> dict:
        s = data.stats
        return dict(conversations=len(data.train), conversations_multi_turn=s.multi_turn,
                    heldout=len(data.heldout) if data.heldout else 0, prompt_cut=s.prompt_cut,
                    response_cut=s.response_cut, truncated=s.truncated, overlength_dropped=s.overlength_dropped,
                    packed=data.packed)
