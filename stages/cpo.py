"""`cpo` — contrastive preference optimisation (Xu et al. 2024) on TRL's experimental CPOTrainer,
reference-free; `loss_type: simpo` makes it SimPO (Meng et al. 2024: length-normalised log-prob
margin with target margin `simpo_gamma`, no reference), one parameter away. Same preference data
readers and hand-off as `dpo` / `orpo`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from medpipe.params import param
from medpipe.stages.training.params import TrainParams
from medpipe.stages.training.reference_free import ReferenceFreePairKind

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


class CPOStage(ReferenceFreePairKind):
    """CPO / SimPO (TRL, experimental): reference-free preference optimisation; LoRA or full."""

    Params = CPOParams

    def trl_classes(self) -> tuple[type, type]:
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        return CPOConfig, CPOTrainer

    @staticmethod
    def alpha(p: CPOParams) -> float:
        """CPO's NLL weight: 1.0, but 0 for pure SimPO, unless set."""
        return p.cpo_alpha if p.cpo_alpha is not None else (0.0 if p.loss_type == "simpo" else 1.0)

    def config_options(self, ctx: Any) -> dict:
        p = ctx.params
        return {"loss_type": p.loss_type, "beta": p.beta, "simpo_gamma": p.simpo_gamma, "cpo_alpha": self.alpha(p)}

    def metrics(self, ctx: Any, trainer: Any, data: Any) -> dict:
        return {**super().metrics(ctx, trainer, data), "pairs": data.pairs, "cpo_alpha": self.alpha(ctx.params)}
