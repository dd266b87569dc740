"""`medcare_mka` — MedCare's mixture-of-knowledge aggregation (the MedCare paper).

Trains, on every FFN linear, KA (one LoRA of rank s·r, never routed) + NA (E routed LoRA experts
of rank r, top-K) + routers, and plain LoRA on the attention projections. Hands on: the attention
LoRA merged into W (a full model, handoff `medcare.base`, what DA trains on), the KA weights
(handoff `medcare.ka`), and as the artifact's model base + KA folded in — MKA is evaluated with
NA dropped, as in the paper; the whole adapter (routers included) is kept in `medcare_adapter/`
for the keep-NA ablation (`medpipe.stages.adapters.medcare_io.load_medcare`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from medpipe.params import param
from medpipe.stages.adapters.settings import MedCareConfig
from medpipe.stages.training.medcare_kind import MedCareKind
from medpipe.stages.training.params import TrainParams


@dataclass
class MedCareMKAParams(TrainParams):
    # the base model is frozen (adapters train beside it): it loads in the training precision
    frozen_base: ClassVar[bool] = True
    # MedCare Appendix (training details): lr 2e-4, warmup_ratio 0.03, cosine, max length 3072, MKA 1 epoch
    changed_defaults = {"lr": 2e-4, "warmup": 0.03}
    max_length: int = param(3072, "tokens per conversation")
    medcare: MedCareConfig = param(help="MedCare layer settings (KA, NA experts, routers, attention LoRA)",
                                   factory=MedCareConfig)
    keep_na_at_inference: bool = param(False, "ablation: evaluate/serve MKA with NA (default: base + KA only)")
    chat_template: Optional[str] = param(None, "Jinja template for tokenizers that have none")


def training_config(p: MedCareMKAParams) -> MedCareConfig:
    """The layer settings MKA trains with: NA is used in training, never in an eval-mode forward
    (held-out loss is that of base + KA, what MKA hands on)."""
    return dataclasses.replace(p.medcare, keep_na=False)


class MedCareMKAStage(MedCareKind):
    """MedCare MKA: KA + mixture-of-LoRA NA on FFN, LoRA on attention; hands on merged attention + KA."""

    Params = MedCareMKAParams
    refuses_zero3 = "its KA hand-off and attention merge read whole weights"

    def model(self, ctx: Any, data: Any):
        from medpipe.stages.adapters import medcare
        from medpipe.stages.training.loop import load_model

        return medcare.inject_mka(load_model(ctx, ctx.params), training_config(ctx.params))

    def metrics(self, ctx: Any, trainer: Any, data: Any) -> dict:
        from medpipe.stages.training.medcare import first_last

        return {**first_last(trainer.state.log_history, "balance_loss"), "conversations": len(data.train)}

    def save(self, ctx: Any, trainer: Any, tok: Any, data: Any, metrics: dict):
        from medpipe.stages.adapters import medcare, medcare_io

        out = ctx.output_dir
        if trainer.is_world_process_zero():
            model = trainer.accelerator.unwrap_model(trainer.model)
            medcare_io.save_medcare(model, out / "medcare_adapter")  # everything, routers included (ablations)
            medcare_io.save_ka(model, out / "ka")
            base = medcare_io.merge_medcare(model, fold_ka=False)  # attention merged, KA and NA dropped
            base.save_pretrained(out / "base")
            tok.save_pretrained(out / "base")
            with_ka = medcare_io.merge_medcare(medcare.inject_da(base, training_config(ctx.params), ka=out / "ka"),
                                               fold_ka=True)
            with_ka.save_pretrained(out / "model")  # base + KA, NA dropped: what MKA is evaluated as
            tok.save_pretrained(out / "model")
        trainer.accelerator.wait_for_everyone()
        ctx.say("NA experts and routers dropped; KA handed on")
        return self.artifact(ctx, metrics, medcare_io.MedCareHandoff(
            base=str(out / "base"), ka=str(out / "ka"), adapter=str(out / "medcare_adapter"),
            adapter_base=ctx.input.model_path, keep_na=ctx.params.keep_na_at_inference))
