"""`kto` — Kahneman-Tversky optimisation (Ethayarajh et al. 2024) on TRL's KTOTrainer: learns
from answers labelled good or bad one at a time (unpaired), the MedicalGPT / Zhongjing style of
feedback. The data: labelled answers as they come (format `kto`, TRL's unpaired shape {prompt,
completion, label}; see samples/kto_feedback_en.jsonl) and/or medpipe's preference pairs, unpaired
as TRL's `unpair_preference_dataset` does (the chosen answer desirable, the rejected undesirable).
Reference = the input model (LoRA: a new adapter TRL builds, disabled for the reference; full: a frozen copy TRL reloads from
`config._name_or_path`, pointed at the input artifact's directory), like `dpo`. Same hand-off."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medpipe.params import param
from medpipe.stagekind import StageKind
from medpipe.stages.training.params import TrainParams

LOSS_TYPES = ("kto", "apo_zero_unpaired")


@dataclass
class KTOParams(TrainParams):
    lr: float = param(5e-7, "peak learning rate (TRL's KTO default; the KTO paper uses 5e-7 for full training)")
    epochs: float = param(1.0, "passes over the answers")
    batch_size: int = param(8, "GLOBAL answers per step (KTO estimates its KL term from the batch: >= 2 per device)")
    max_length: int = param(1024, "tokens of prompt + answer")
    beta: float = param(0.1, "KTO β: strength of the KL penalty to the reference")
    loss_type: str = param("kto", "kto | apo_zero_unpaired")
    desirable_weight: float = param(1.0, "weight of the desirable (good) answers' loss")
    undesirable_weight: float = param(1.0, "weight of the undesirable (bad) answers' loss")

    def _rules(self):
        return super()._rules() + [("beta", self.beta > 0, "> 0"),
                                   ("loss_type", self.loss_type in LOSS_TYPES, "one of " + ", ".join(LOSS_TYPES)),
                                   ("desirable_weight", self.desirable_weight > 0, "> 0"),
                                   ("undesirable_weight", self.undesirable_weight > 0, "> 0")]


def feedback_rows(records: list[dict], say) -> list[dict]:
    """TRL's conversational unpaired rows: a labelled answer (format `kto`) as it is; a preference
    pair as its chosen answer (label true) and its rejected answer (label false), as TRL's
    `unpair_preference_dataset`."""
    from medpipe.stages.training.preference import unpaired_rows

    rows = [{"prompt": r["prompt"], "completion": [{"role": "assistant", "content": r["completion"]}], "label": r["label"]}
            for r in records if "completion" in r]
    pairs = [r for r in records if "completion" not in r]
    return rows + (unpaired_rows(pairs, say) if pairs else [])


class KTOStage(StageKind):
    """KTO (TRL): unpaired good/bad answers, reference = the input model; LoRA or full."""

    Params = KTOParams

    def check(self, params: Any, base: Any, data_opts: dict) -> list[str]:
        from medpipe.stages.training.preference import check_pairs

        return check_pairs(params, base, data_opts, want="feedback")

    def run(self, ctx: Any):
        from datasets import Dataset
        from trl import KTOConfig, KTOTrainer

        from medpipe.errors import MedpipeError
        from medpipe.stages.training.args import batch_layout, training_kwargs
        from medpipe.stages.training.callbacks import callbacks
        from medpipe.stages.models.loader import lora_config
        from medpipe.stages.training.loop import load_model, load_tokenizer, save_result, train
        from medpipe.data import load_records
        from medpipe.stages.training.params import data_options

        p: KTOParams = ctx.params
        micro, _ = batch_layout(ctx, p)
        if micro < 2:
            raise MedpipeError(f"stages.{ctx.name}.batch_size: KTO estimates its KL term within a device's batch: "
                               f"needs >= 2 answers per device, got {micro} (raise batch_size or micro_batch_size)")
        tok = load_tokenizer(ctx)
        loaded = load_records(p.data, "feedback", heldout=p.heldout, **data_options(p, ctx.data))
        rows, held = feedback_rows(loaded.records, ctx.say), feedback_rows(loaded.heldout, ctx.say)
        if not rows:
            raise MedpipeError(f"stages.{ctx.name}: no usable labelled answers or preference pairs in {p.data}")
        model = load_model(ctx, p)  # seeds: the LoRA TRL builds on it starts the same in any process
        model.config._name_or_path = str(ctx.input.model_path)  # a full-training reference reloads from here
        args = KTOConfig(**training_kwargs(ctx, p), beta=p.beta, loss_type=p.loss_type, max_length=p.max_length,
                         desirable_weight=p.desirable_weight, undesirable_weight=p.undesirable_weight,
                         trust_remote_code=bool(ctx.model.get("trust_remote_code", False)))
        trainer = KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             eval_dataset=Dataset.from_list(held) if held else None, processing_class=tok,
                             peft_config=lora_config(p.peft) if p.peft else None, callbacks=callbacks(ctx, p))
        metrics = train(trainer, ctx)
        last = next((h for h in reversed(trainer.state.log_history) if "kl" in h), {})
        metrics.update({k.replace("/", "_"): v for k, v in last.items() if k in ("kl", "rewards/margins")})
        metrics.update(answers=len(rows), desirable=sum(r["label"] for r in rows))
        return save_result(ctx, trainer, tok, p, metrics)
