"""`orpo` — odds-ratio preference optimisation (Hong et al. 2024) on TRL's experimental
ORPOTrainer: SFT on the chosen answer and a preference term (λ × log-sigmoid of the log odds
ratio of chosen over rejected) in one stage, no reference model. Same preference data readers as
`dpo` (pairs; identical chosen/rejected dropped, counted), same hand-off (LoRA adapter + merged
model, or the full model). TRL's config calls λ `beta`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from medpipe.params import param
from medpipe.stages.training.params import TrainParams
from medpipe.stages.training.reference_free import ReferenceFreePairKind


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


class ORPOStage(ReferenceFreePairKind):
    """ORPO (TRL, experimental): SFT + odds-ratio preference in one stage, reference-free; LoRA or full."""

    Params = ORPOParams

    logged = ReferenceFreePairKind.logged + ("log_odds_ratio", "nll_loss")

    def trl_classes(self) -> tuple[type, type]:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOConfig, ORPOTrainer

    def config_options(self, ctx: Any) -> dict:
        return {"beta": ctx.params.beta}

    def metrics(self, ctx: Any, trainer: Any, data: Any) -> dict:
        return {**super().metrics(ctx, trainer, data), "pairs": data.pairs,
                "identical_pairs_dropped": data.read - data.pairs}
