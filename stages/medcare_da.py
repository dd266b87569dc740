"""`medcare_da` — MedCare's downstream alignment (the MedCare paper).

Input: MKA's hand-off (attention LoRA merged, frozen) + its KA weights (trainable by default).
Adds an Align LoRA (rank s·r) on the same FFN linears; loss = CE + λ·Σ|A_KA A_Alignᵀ|, scaled for
gradient accumulation like the CE. Output: KA and Align folded into W — a plain model that loads
with `from_pretrained` and needs no medpipe code. Ablations (Table 3): `orth_lambda=0` (DA without
the orthogonal loss); `keep_na: true` (DA with NA kept: MKA's routed experts train on and are used
at inference, through the `load_for_inference` hook; the plain model has them dropped); a recipe
without MKA before DA trains KA from scratch (said in the log).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from medpipe.params import param
from medpipe.stages.adapters.settings import MedCareConfig
from medpipe.stages.training.medcare_kind import MedCareKind
from medpipe.stages.training.params import TrainParams


@dataclass
class MedCareDAParams(TrainParams):
    # the base model is frozen (adapters train beside it): it loads in the training precision
    frozen_base: ClassVar[bool] = True
    # MedCare Appendix (training details): lr 2e-4, warmup_ratio 0.03, cosine, max length 3072, DA 3 epochs, λ = 1
    changed_defaults = {"lr": 2e-4, "epochs": 3.0, "warmup": 0.03}
    max_length: int = param(3072, "tokens per conversation")
    orth_lambda: float = param(1.0, "λ of the orthogonal loss λ·Σ|A_KA A_Alignᵀ| (0 = the ablation without it)")
    medcare: MedCareConfig = param(help="MedCare layer settings (r, alpha, s must match MKA's: checked against "
                                        "the saved KA)", factory=MedCareConfig)
    keep_na: bool = param(False, "ablation (Table 3, 'DA with NA kept'): MKA's routed NA experts and routers stay in "
                                 "the FFN through DA (trained) and at inference")
    chat_template: Optional[str] = param(None, "Jinja template for tokenizers that have none")

    def _rules(self):
        return super()._rules() + [("orth_lambda", self.orth_lambda >= 0, ">= 0 (0 = no orthogonal loss)")]


class MedCareDAStage(MedCareKind):
    """MedCare DA: KA + Align LoRA on FFN with the orthogonal loss; exports a plain merged model."""

    Params = MedCareDAParams
    refuses_zero3 = "its orthogonal loss needs whole weights"

    def run(self, ctx: Any):
        from medpipe.stages.adapters import medcare_io

        p: MedCareDAParams = ctx.params
        self.handed = medcare_io.MedCareHandoff.of(ctx.input) or medcare_io.MedCareHandoff()
        if p.keep_na and not (self.handed.adapter and self.handed.ka):
            from medpipe.errors import MedpipeError

            raise MedpipeError(f"stages.{ctx.name}.keep_na: needs an MKA stage right before (its routed experts "
                               f"are kept); the input {ctx.input.stage} hands on none")
        if self.handed.ka is None:
            ctx.say("no MKA before this stage: KA starts from scratch (the 'DA without MKA' ablation)")
        if p.keep_na:
            ctx.say("NA kept: MKA's routed experts and routers train on through DA (the Table 3 ablation)")
        return super().run(ctx)

    def model_dir(self, ctx: Any) -> str:
        """MKA's hand-off (attention LoRA merged), else the input model."""
        return self.handed.base or ctx.input.model_path

    def model(self, ctx: Any, data: Any):
        from medpipe.stages.adapters import medcare
        from medpipe.stages.training.loop import load_model

        p: MedCareDAParams = ctx.params
        return medcare.inject_da(load_model(ctx, p, self.model_dir(ctx)), p.medcare, ka=self.handed.ka,
                                 keep_na=self.handed.adapter if p.keep_na else None)

    def trainer_options(self, ctx: Any, data: Any) -> dict:
        return {"orth_lambda": ctx.params.orth_lambda}

    def metrics(self, ctx: Any, trainer: Any, data: Any) -> dict:
        from medpipe.stages.training.medcare import first_last

        return {**first_last(trainer.state.log_history, "orth_loss"), **first_last(trainer.state.log_history, "ce_loss")}

    def save(self, ctx: Any, trainer: Any, tok: Any, data: Any, metrics: dict):
        from medpipe.stages.adapters import medcare_io

        out = ctx.output_dir
        if trainer.is_world_process_zero():
            model = trainer.accelerator.unwrap_model(trainer.model)
            medcare_io.save_medcare(model, out / "medcare_adapter")  # KA + Align (+ NA), unmerged
            merged = medcare_io.merge_medcare(model, fold_ka=True)  # NA (keep_na) is never folded: dropped here
            merged.save_pretrained(out / "model")
            tok.save_pretrained(out / "model")
        trainer.accelerator.wait_for_everyone()
        base = self.model_dir(ctx)
        return self.artifact(ctx, metrics, medcare_io.MedCareHandoff(
            base=base, adapter=str(out / "medcare_adapter"), adapter_base=base, keep_na=ctx.params.keep_na))
