"""`dpo` — direct preference optimisation on TRL's DPOTrainer.

The reference policy is this stage's input model (the SFT result), never the recipe's base model:
with LoRA, TRL uses the input model with the adapter disabled (one model in memory); for full
training it loads a frozen copy of the input model. The stage records the reference log-probs of
a few pairs (`ref_probe`) so the choice of reference is checkable from outside.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medpipe.stages.training.params import TrainParams


@dataclass
class DPOParams(TrainParams):
    lr: float = 2e-5
    epochs: float = 1.0
    warmup: float = 0.05
    weight_decay: float = 0.05
    max_length: int = 512
    beta: float = 0.1
    loss_type: str = "sigmoid"  # any TRL DPO loss_type (sigmoid, ipo, hinge, robust, ...)
    truncation_mode: str = "keep_start"  # TRL's default (its keep_end is deprecated)
    ref_probe: int = 4  # pairs whose reference log-probs are saved to ref_probe.pt (0 = off)
    reward_eval_pairs: int = 64  # training pairs whose rewards are re-evaluated after training (0 = off)

    def _rules(self):
        return super()._rules() + [("beta", self.beta > 0, "> 0"), ("ref_probe", self.ref_probe >= 0, ">= 0"),
                                   ("reward_eval_pairs", self.reward_eval_pairs >= 0, ">= 0")]


def preference_rows(records: list[dict], say) -> list[dict]:
    """TRL's conversational preference rows; identical chosen/rejected pairs teach nothing: dropped, counted."""
    rows, same = [], 0
    for r in records:
        if r["chosen"].strip() == r["rejected"].strip():
            same += 1
            continue
        rows.append({"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                     "rejected": [{"role": "assistant", "content": r["rejected"]}]})
    if same:
        say(f"warning: {same} pair(s) with chosen == rejected dropped")
    return rows


class DPOStage:
    """Direct preference optimisation (TRL), reference = the input model; LoRA or full."""

    Params = DPOParams

    def check(self, params: DPOParams, base: Any, data_opts: dict) -> list[str]:
        from medpipe.stages.training.params import data_options
        from medpipe.data import load_records

        return load_records(params.data, "preference", **data_options(params, data_opts)).summary_table().splitlines()

    def run(self, ctx: Any):
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        from medpipe.errors import MedpipeError
        from medpipe.stages.training import common
        from medpipe.stages.training.params import data_options
        from medpipe.data import load_records

        p: DPOParams = ctx.params
        if ctx.index == 0:
            ctx.say(f"DPO is the first stage: the reference policy is the given model {ctx.input.model_path}")
        tok = common.load_tokenizer(ctx)
        loaded = load_records(p.data, "preference", heldout=p.heldout, **data_options(p, ctx.data))
        rows = preference_rows(loaded.records, ctx.say)
        if not rows:
            raise MedpipeError(f"stages.{ctx.name}: no usable preference pairs in {p.data}")
        train_ds = Dataset.from_list(rows)
        eval_ds = Dataset.from_list(preference_rows(loaded.heldout, ctx.say)) if loaded.heldout else None
        model = common.apply_lora(common.load_model(ctx, p), p.peft)
        args = DPOConfig(**common.training_kwargs(ctx, p), beta=p.beta, loss_type=[p.loss_type],
                         max_length=p.max_length, truncation_mode=p.truncation_mode)
        trainer = DPOTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                             processing_class=tok, callbacks=common.callbacks(ctx, p))
        if p.ref_probe > 0 and trainer.is_world_process_zero():
            save_ref_probe(trainer, trainer.train_dataset, p.ref_probe, ctx.output_dir / "ref_probe.pt")
        metrics = common.train(trainer, ctx)
        if p.reward_eval_pairs > 0:
            metrics.update(reward_metrics(trainer, trainer.train_dataset, p.reward_eval_pairs))
            ctx.say(f"reward accuracy on the training pairs {metrics['reward_accuracy']:.3f}, "
                    f"margin {metrics['reward_margin']:.3f}")
        metrics["pairs"] = len(train_ds)
        metrics["identical_pairs_dropped"] = len(loaded.records) - len(rows)
        return common.save_result(ctx, trainer, tok, p, metrics)


def save_ref_probe(trainer, dataset, n: int, path) -> None:
    """Reference log-probs of the first n pairs, computed by the trainer's own reference path."""
    import torch

    loader = trainer.get_eval_dataloader(dataset.select(range(min(n, len(dataset)))))
    batch = next(iter(loader))
    chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    torch.save({"input_ids": batch["input_ids"].cpu(), "attention_mask": batch["attention_mask"].cpu(),
                "completion_mask": batch["completion_mask"].cpu(),
                "ref_chosen_logps": chosen.cpu(), "ref_rejected_logps": rejected.cpu()}, path)


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
