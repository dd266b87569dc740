"""`cpo` — contrastive preference optimisation (Xu et al. 2024) on TRL's experimental CPOTrainer,
reference-free; `loss_type: simpo` makes it SimPO (Meng et al. 2024: length-normalised log-prob
margin with target margin `simpo_gamma`, no reference), one parameter away. Same preference data
readers and hand-off as `dpo` / `orpo`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from medpipe.params import param
from medpipe.stagekind import StageKind
from medpipe.stages.training.params import TrainParams

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")


@dataclass
class CPOParams(TrainParams):
    lr: float = param(1e-6, "peak learning rate (TRL's default)")
    epochs: float = param(1.0, "passes over the pairs")
    max_length: int = param(1024, "tokens of prompt + response")
    max_completion_length: Optional[int] = param(None, "tokens of each response; null = max_length decides")
    loss_type: str = param("sigmoid", "sigmoid (CPO) | hinge | ipo | simpo (SimPO) | alphapo")
    beta: float = param(0.1, "β of the preference term (SimPO paper: 2.0-2.5)")
    simpo_gamma: float = param(0.5, "SimPO target reward margin γ")
    cpo_alpha: Optional[float] = param(None, "weight of CPO's NLL (behaviour cloning) term; null = 1.0, but 0 for "
                                             "loss_type simpo (pure SimPO)")

    def _rules(self):
        return super()._rules() + [("beta", self.beta > 0, "> 0"),
                                   ("loss_type", self.loss_type in LOSS_TYPES, "one of " + ", ".join(LOSS_TYPES)),
                                   ("cpo_alpha", self.cpo_alpha is None or self.cpo_alpha >= 0, ">= 0 or null")]


class CPOStage(StageKind):
    """CPO / SimPO (TRL, experimental): reference-free preference optimisation; LoRA or full."""

    Params = CPOParams

    def check(self, params: Any, base: Any, data_opts: dict) -> list[str]:
        from medpipe.stages.training.preference import check_pairs

        return check_pairs(params, base, data_opts)

    def run(self, ctx: Any):
        import os

        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from datasets import Dataset
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        from medpipe.stages.training.args import training_kwargs
        from medpipe.stages.training.callbacks import callbacks
        from medpipe.stages.training.loop import apply_lora, load_model, load_tokenizer, save_result, train
        from medpipe.stages.training.preference import load_rows

        p: CPOParams = ctx.params
        tok = load_tokenizer(ctx)
        rows, held, _ = load_rows(ctx, p)
        alpha = p.cpo_alpha if p.cpo_alpha is not None else (0.0 if p.loss_type == "simpo" else 1.0)
        model = apply_lora(load_model(ctx, p), p.peft)
        args = CPOConfig(**training_kwargs(ctx, p), loss_type=p.loss_type, beta=p.beta, simpo_gamma=p.simpo_gamma,
                         cpo_alpha=alpha, max_length=p.max_length, max_completion_length=p.max_completion_length,
                         trust_remote_code=bool(ctx.model.get("trust_remote_code", False)))
        trainer = CPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             eval_dataset=Dataset.from_list(held) if held else None, processing_class=tok,
                             callbacks=callbacks(ctx, p))
        metrics = train(trainer, ctx)
        last = next((h for h in reversed(trainer.state.log_history) if "rewards/accuracies" in h), {})
        metrics.update({k.replace("/", "_"): v for k, v in last.items() if k in ("rewards/accuracies", "rewards/margins")})
        metrics.update(pairs=len(rows), cpo_alpha=alpha)
        return save_result(ctx, trainer, tok, p, metrics)
