"""`dpo` — direct preference optimisation on TRL's DPOTrainer.

The reference policy is this stage's input model (the SFT result), never the recipe's base model:
with LoRA, TRL uses the input model with the adapter disabled (one model in memory); for full
training it loads a frozen copy of the input model. The stage records the reference log-probs of
a few pairs (`ref_probe`) so the choice of reference is checkable from outside.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from medpipe.params import param
from medpipe.stagekind import StageKind
from medpipe.stages.training.params import TrainParams


# trl/trainer/dpo_config.py (TRL 1.16) `loss_type`: the losses DPOTrainer implements
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


@dataclass
class DPOParams(TrainParams):
    changed_defaults = {"warmup": 0.05, "weight_decay": 0.05}
    max_length: int = param(512, "tokens of prompt + response (TRL cuts the rest, see truncation_mode)")
    max_prompt_length: Optional[int] = param(None, "prompt tokens kept (its END, nearest the answer, as TRL < 0.20 "
                                                   "did); null = no separate prompt limit")
    max_response_length: Optional[int] = param(None, "tokens kept of each response (chosen, rejected; the start); "
                                                       "null = no separate limit")
    beta: float = param(0.1, "DPO β: strength of the KL penalty to the reference")
    loss_type: str = param("sigmoid", "any TRL DPO loss_type (sigmoid, ipo, hinge, robust, ...)", choices=DPO_LOSSES)
    truncation_mode: str = param("keep_start", "how TRL cuts prompt+response beyond max_length (its keep_end is deprecated)",
                                 choices=("keep_start", "keep_end"))
    ref_probe: int = param(4, "pairs whose reference log-probs are saved to ref_probe.pt (0 = off)")
    reward_eval_pairs: int = param(64, "training pairs whose rewards are re-evaluated after training (0 = off)")

    def _rules(self):
        return super()._rules() + [("beta", self.beta > 0, "> 0"), ("ref_probe", self.ref_probe >= 0, ">= 0"),
                                   ("reward_eval_pairs", self.reward_eval_pairs >= 0, ">= 0"),
                                   ("max_prompt_length", self.max_prompt_length is None or self.max_prompt_length >= 1,
                                    ">= 1 or null"),
                                   ("max_response_length",
                                    self.max_response_length is None or self.max_response_length >= 1, ">= 1 or null")]


def cut_lengths(dataset: Any, max_prompt: int | None, max_response: int | None) -> Any:
    """TRL's tokenised pairs with the prompt and each response limited separately (Qilin-Med: source
    256, target 256): the prompt keeps its last `max_prompt` tokens, chosen/rejected their first
    `max_response`. TRL 1.16's DPOConfig has one max_length only."""
    if dataset is None or (max_prompt is None and max_response is None):
        return dataset

    def cut(row: dict) -> dict:
        if max_prompt is not None:
            row["prompt_ids"] = row["prompt_ids"][-max_prompt:]
        if max_response is not None:
            row["chosen_ids"] = row["chosen_ids"][:max_response]
            row["rejected_ids"] = row["rejected_ids"][:max_response]
        return row

    return dataset.map(cut, desc="prompt/response lengths")


class DPOStage(StageKind):
    """Direct preference optimisation (TRL), reference = the input model; LoRA or full."""

    Params = DPOParams

    def check(self, params: DPOParams, base: Any, data_opts: dict) -> list[str]:
        from medpipe.stages.training.preference import check_pairs

        return check_pairs(params, base, data_opts)

    def run(self, ctx: Any):
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        from medpipe.data import load_records
        from medpipe.errors import MedpipeError
        from medpipe.stages.training.args import training_kwargs
        from medpipe.stages.training.callbacks import callbacks
        from medpipe.stages.training.loop import apply_lora, load_model, load_tokenizer, save_result, train
        from medpipe.stages.training.params import data_options
        from medpipe.stages.training.preference import pair_rows

        p: DPOParams = ctx.params
        if ctx.index == 0:
            ctx.say(f"DPO is the first stage: the reference policy is the given model {ctx.input.model_path}")
        tok = load_tokenizer(ctx)
        loaded = load_records(p.data, "preference", heldout=p.heldout, **data_options(p, ctx.data))
        rows = pair_rows(loaded.records, ctx.say)
        if not rows:
            raise MedpipeError(f"stages.{ctx.name}: no usable preference pairs in {p.data}")
        train_ds = Dataset.from_list(rows)
        eval_ds = Dataset.from_list(pair_rows(loaded.heldout, ctx.say)) if loaded.heldout else None
        # the config first: with deepspeed=zero3 it registers ZeRO-3 (transformers' HfDeepSpeedConfig, kept
        # alive by `args`), so the policy below — and the frozen reference TRL loads for full DPO — are
        # loaded partitioned under deepspeed.zero.Init, as TRL's fused lm-head gather expects
        args = DPOConfig(**training_kwargs(ctx, p), beta=p.beta, loss_type=[p.loss_type],
                         max_length=p.max_length, truncation_mode=p.truncation_mode)
        model = apply_lora(load_model(ctx, p), p.peft)  # load_model seeds: the same LoRA init in any process
        trainer = DPOTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                             processing_class=tok, callbacks=callbacks(ctx, p))
        trainer.train_dataset = cut_lengths(trainer.train_dataset, p.max_prompt_length, p.max_response_length)
        trainer.eval_dataset = cut_lengths(trainer.eval_dataset, p.max_prompt_length, p.max_response_length)
        metrics = train(trainer, ctx)
        if p.ref_probe > 0:  # every rank: under ZeRO-3 the forward gathers each layer from all of them
            save_ref_probe(trainer, trainer.train_dataset, p.ref_probe, ctx.output_dir / "ref_probe.pt")
        if p.reward_eval_pairs > 0:
            metrics.update(reward_metrics(trainer, trainer.train_dataset, p.reward_eval_pairs))
            ctx.say(f"reward accuracy on the training pairs {metrics['reward_accuracy']:.3f}, "
                    f"margin {metrics['reward_margin']:.3f}")
        metrics["pairs"] = len(train_ds)
        metrics["identical_pairs_dropped"] = len(loaded.records) - len(rows)
        return save_result(ctx, trainer, tok, p, metrics)


def save_ref_probe(trainer, dataset, n: int, path) -> None:
    """Reference log-probs of the first n pairs, by the trainer's own reference path. Computed after
    training: only then has the trainer placed the model (DeepSpeed moves it to the rank's GPU when
    training starts; before, the batch is on cuda:LOCAL_RANK and the weights on the CPU), and the
    reference is unchanged by training (the adapter disabled, TRL's frozen `ref` adapter, or the
    separate frozen reference model). Every rank runs the same forward on the same pairs (under
    ZeRO-3 each layer's weights are all-gathered from every rank: a rank-0-only forward would wait
    forever); rank 0 writes the file."""
    import torch

    rows = dataset.select(range(min(n, len(dataset))))
    batch = trainer._prepare_inputs(trainer.data_collator([rows[i] for i in range(len(rows))]))
    model = trainer.ref_model if trainer.ref_model is not None else trainer.model
    was_training = model.training
    model.eval()
    try:
        chosen, rejected = trainer.compute_ref_log_probs(model, batch)
    finally:
        model.train(was_training)
    if not trainer.is_world_process_zero():
        return
    torch.save({"input_ids": batch["input_ids"].cpu(), "attention_mask": batch["attention_mask"].cpu(),
                "completion_mask": batch["completion_mask"].cpu(),
                "ref_chosen_logps": chosen.float().cpu(), "ref_rejected_logps": rejected.float().cpu()}, path)


def reward_metrics(trainer, dataset, limit: int) -> dict:
    """Rewards over (up to `limit` of) the training pairs after training, by TRL's own evaluation."""
    pairs = dataset.select(range(min(limit, len(dataset))))
    ev = trainer.evaluate(eval_dataset=pairs, metric_key_prefix="pairs")
    first = next((h for h in trainer.state.log_history if "rewards/accuracies" in h), {})

    def get(name: str) -> float:  # TRL reports these as eval_rewards/... whatever the prefix
        return float(ev.get(f"pairs_rewards/{name}", ev.get(f"eval_rewards/{name}", float("nan"))))

    return {"reward_accuracy": get("accuracies"), "reward_margin": get("margins"),
            "reward_chosen": get("chosen"), "reward_rejected": get("rejected"),
            "first_reward_accuracy": first.get("rewards/accuracies", float("nan")),
            "pairs_evaluated": len(pairs), "pairs_loss": ev.get("pairs_loss", float("nan"))}
