"""`orpo` — odds-ratio preference optimisation (Hong et al. 2024) on TRL's experimental
ORPOTrainer: SFT on the chosen answer and a preference term (λ × log-sigmoid of the log odds
ratio of chosen over rejected) in one stage, no reference model. Same preference data readers as
`dpo` (pairs; identical chosen/rejected dropped, counted), same hand-off (LoRA adapter + merged
model, or the full model). TRL's config calls λ `beta`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from medpipe.params import param
from medpipe.stagekind import StageKind
from medpipe.stages.training.params import TrainParams


@dataclass
class ORPOParams(TrainParams):
    lr: float = param(8e-6, "peak learning rate (ORPO paper: 8e-6 for its 7B runs)")
    epochs: float = param(1.0, "passes over the pairs")
    warmup: float = param(0.1, "< 1: fraction of the total steps; >= 1: steps")
    max_length: int = param(1024, "tokens of prompt + response")
    max_completion_length: Optional[int] = param(None, "tokens of each response; null = max_length decides")
    beta: float = param(0.1, "λ: weight of the odds-ratio term against the SFT loss (TRL `beta`)")

    def _rules(self):
        return super()._rules() + [("beta", self.beta > 0, "> 0"),
                                   ("max_completion_length",
                                    self.max_completion_length is None or self.max_completion_length >= 1,
                                    ">= 1 or null")]


class ORPOStage(StageKind):
    """ORPO (TRL, experimental): SFT + odds-ratio preference in one stage, reference-free; LoRA or full."""

    Params = ORPOParams

    def check(self, params: Any, base: Any, data_opts: dict) -> list[str]:
        from medpipe.stages.training.preference import check_pairs

        return check_pairs(params, base, data_opts)

    def run(self, ctx: Any):
        import os

        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from datasets import Dataset
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        from medpipe.stages.training.args import training_kwargs
        from medpipe.stages.training.callbacks import callbacks
        from medpipe.stages.training.loop import apply_lora, load_model, load_tokenizer, save_result, train
        from medpipe.stages.training.preference import load_rows

        p: ORPOParams = ctx.params
        tok = load_tokenizer(ctx)
        rows, held, read = load_rows(ctx, p)
        model = apply_lora(load_model(ctx, p), p.peft)
        args = ORPOConfig(**training_kwargs(ctx, p), beta=p.beta, max_length=p.max_length,
                          max_completion_length=p.max_completion_length,
                          trust_remote_code=bool(ctx.model.get("trust_remote_code", False)))
        trainer = ORPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                              eval_dataset=Dataset.from_list(held) if held else None, processing_class=tok,
                              callbacks=callbacks(ctx, p))
        metrics = train(trainer, ctx)
        last = next((h for h in reversed(trainer.state.log_history) if "rewards/accuracies" in h), {})
        metrics.update({k.replace("/", "_"): v for k, v in last.items()
                        if k in ("rewards/accuracies", "rewards/margins", "log_odds_ratio", "nll_loss")})
        metrics.update(pairs=len(rows), identical_pairs_dropped=read - len(rows))
        return save_result(ctx, trainer, tok, p, metrics)
