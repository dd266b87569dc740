"""`medcare_da` — MedCare's downstream alignment (METHODS.md, MedCare).

Input: MKA's hand-off (attention LoRA merged, frozen) + its KA weights (trainable by default).
Adds an Align LoRA (rank s·r) on the same FFN linears; loss = CE + λ·Σ|A_KA A_Alignᵀ|, scaled for
gradient accumulation like the CE. Output: KA and Align folded into W — a plain model that loads
with `from_pretrained` and needs no medpipe code. Ablations: `orth_lambda=0` (DA without the
orthogonal loss); a recipe without MKA before DA trains KA from scratch (said in the log).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from medpipe.stages.training.params import TrainParams


@dataclass
class MedCareDAParams(TrainParams):
    lr: float = 2e-4
    epochs: float = 3.0
    warmup: float = 0.03
    scheduler: str = "cosine"
    max_length: int = 3072
    orth_lambda: float = 1.0
    train_ka: bool = True
    r: int = 16  # must match MKA's (checked against the saved KA)
    alpha: float = 32.0
    s: int = 2
    align_rank: Optional[int] = None  # default s·r, like KA
    align_dropout: float = 0.05
    chat_template: Optional[str] = None


def da_config(p: MedCareDAParams):
    from medpipe.stages.adapters.medcare import MedCareConfig

    return MedCareConfig(r=p.r, alpha=p.alpha, s=p.s, align_rank=p.align_rank, align_dropout=p.align_dropout,
                         train_ka=p.train_ka)


class MedCareDAStage:
    """MedCare DA: KA + Align LoRA on FFN with the orthogonal loss; exports a plain merged model."""

    Params = MedCareDAParams

    def check(self, params: Any, base: Any, data_opts: dict) -> list[str]:
        from medpipe.errors import ConfigError
        from medpipe.stages.adapters.medcare import check_settings
        from medpipe.stages.training.chat_data import check_chat_data

        if params.orth_lambda < 0:
            raise ConfigError(f"medcare_da: orth_lambda must be >= 0 (0 = no orthogonal loss), got {params.orth_lambda}")
        check_settings(lambda: da_config(params), "medcare_da")
        return check_chat_data(params, base, data_opts)

    def run(self, ctx: Any):
        from trl import SFTConfig

        from medpipe.artifact import Artifact
        from medpipe.stages.training import common
        from medpipe.stages.adapters import medcare
        from medpipe.stages.training.params import data_options
        from medpipe.data import load_records
        from medpipe.stages.training.medcare import MedCareTrainer, first_last
        from medpipe.stages.training.chat_data import encode_dataset

        p: MedCareDAParams = ctx.params
        handed = medcare.MedCareHandoff.of(ctx.input) or medcare.MedCareHandoff()
        base_path = handed.base or ctx.input.model_path
        ka = handed.ka
        if ka is None:
            ctx.say("no MKA before this stage: KA starts from scratch (the 'DA without MKA' ablation)")
        tok = common.load_tokenizer(ctx, base_path)
        if p.chat_template:
            tok.chat_template = p.chat_template
        loaded = load_records(p.data, "chat", **data_options(p, ctx.data))
        train_ds = encode_dataset(loaded.records, tok, p.max_length, common.data_cache_dir(ctx))
        model = medcare.inject_da(common.load_model(ctx, p, base_path), da_config(p), ka=ka)
        args = SFTConfig(**common.training_kwargs(ctx, p), max_length=p.max_length)
        trainer = MedCareTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tok,
                                 callbacks=common.callbacks(ctx, p), orth_lambda=p.orth_lambda)
        metrics = common.train(trainer, ctx)
        metrics.update(first_last(trainer.state.log_history, "orth_loss"))
        metrics.update(first_last(trainer.state.log_history, "ce_loss"))
        out = ctx.output_dir
        if trainer.is_world_process_zero():
            model = trainer.accelerator.unwrap_model(trainer.model)
            medcare.save_medcare(model, out / "medcare_adapter")  # KA + Align, unmerged
            merged = medcare.merge_medcare(model, fold_ka=True)
            merged.save_pretrained(out / "model")
            tok.save_pretrained(out / "model")
        trainer.accelerator.wait_for_everyone()
        return Artifact(stage=ctx.name, kind=ctx.kind, format="full", model_path=str(out / "model"),
                        tokenizer_path=str(out / "model"), metrics=metrics,
                        trust_remote_code=bool(ctx.model.get("trust_remote_code", False)),
                        handoff=medcare.MedCareHandoff(base=base_path, adapter=str(out / "medcare_adapter"),
                                                       adapter_base=base_path).record())
