"""`medcare_mka` — MedCare's mixture-of-knowledge aggregation (METHODS.md, MedCare).

Trains, on every FFN linear, KA (one LoRA of rank s·r, never routed) + NA (E routed LoRA experts
of rank r, top-K) + routers, and plain LoRA on the attention projections. Hands on: the attention
LoRA merged into W (a full model, handoff `medcare.base`, what DA trains on), the KA weights
(handoff `medcare.ka`), and as the artifact's model base + KA folded in — MKA is evaluated with
NA dropped, as in the paper; the whole adapter (routers included) is kept in `medcare_adapter/`
for the keep-NA ablation (`medpipe.stages.adapters.medcare.load_medcare`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from medpipe.stages.training.params import TrainParams


@dataclass
class MedCareMKAParams(TrainParams):
    lr: float = 2e-4
    epochs: float = 1.0
    warmup: float = 0.03
    scheduler: str = "cosine"
    max_length: int = 3072
    r: int = 16  # rank of each routed expert; KA has rank s·r
    alpha: float = 32.0  # every LoRA in the layer is scaled by alpha / r
    s: int = 2
    n_experts: int = 8
    top_k: int = 2
    renormalize: bool = True  # renormalise the K selected gate weights to sum 1
    balance_coef: float = 0.0  # load-balancing aux loss (0 = off, as published)
    expert_dropout: float = 0.0  # no dropout on the MoLoRA path (published choice)
    attn_dropout: float = 0.05
    keep_na_at_inference: bool = False  # ablation: evaluate/serve MKA with NA (default: base + KA only)
    chat_template: Optional[str] = None


def medcare_config(p: Any):
    from medpipe.stages.adapters.medcare import MedCareConfig

    return MedCareConfig(r=p.r, alpha=p.alpha, s=p.s, n_experts=p.n_experts, top_k=p.top_k,
                         renormalize=p.renormalize, balance_coef=p.balance_coef, expert_dropout=p.expert_dropout,
                         attn_dropout=p.attn_dropout, keep_na=False)


class MedCareMKAStage:
    """MedCare MKA: KA + mixture-of-LoRA NA on FFN, LoRA on attention; hands on merged attention + KA."""

    Params = MedCareMKAParams

    @staticmethod
    def load_for_inference(art: Any):
        """Inference hook: the keep-NA ablation loads base + routed experts; else the plain model."""
        from medpipe.stages.adapters import medcare

        return medcare.load_for_inference(art)

    def check(self, params: Any, base: Any, data_opts: dict) -> list[str]:
        from medpipe.stages.adapters.medcare import check_settings
        from medpipe.stages.training.chat_data import check_chat_data

        check_settings(lambda: medcare_config(params), "medcare_mka")
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

        p: MedCareMKAParams = ctx.params
        tok = common.load_tokenizer(ctx)
        if p.chat_template:
            tok.chat_template = p.chat_template
        loaded = load_records(p.data, "chat", **data_options(p, ctx.data))
        train_ds = encode_dataset(loaded.records, tok, p.max_length, common.data_cache_dir(ctx))
        model = medcare.inject_mka(common.load_model(ctx, p), medcare_config(p))
        args = SFTConfig(**common.training_kwargs(ctx, p), max_length=p.max_length)
        trainer = MedCareTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tok,
                                 callbacks=common.callbacks(ctx, p))
        metrics = common.train(trainer, ctx)
        metrics.update(first_last(trainer.state.log_history, "balance_loss"), conversations=len(train_ds))
        out = ctx.output_dir
        if trainer.is_world_process_zero():
            model = trainer.accelerator.unwrap_model(trainer.model)
            medcare.save_medcare(model, out / "medcare_adapter")  # everything, routers included (ablations)
            medcare.save_ka(model, out / "ka")
            base = medcare.merge_medcare(model, fold_ka=False)  # attention merged, KA and NA dropped
            base.save_pretrained(out / "base")
            tok.save_pretrained(out / "base")
            with_ka = medcare.merge_medcare(medcare.inject_da(base, medcare_config(p), ka=out / "ka"), fold_ka=True)
            with_ka.save_pretrained(out / "model")  # base + KA, NA dropped: what MKA is evaluated as
            tok.save_pretrained(out / "model")
        trainer.accelerator.wait_for_everyone()
        ctx.say("NA experts and routers dropped; KA handed on")
        return Artifact(stage=ctx.name, kind=ctx.kind, format="full", model_path=str(out / "model"),
                        tokenizer_path=str(out / "model"), metrics=metrics,
                        trust_remote_code=bool(ctx.model.get("trust_remote_code", False)),
                        handoff=medcare.MedCareHandoff(
                            base=str(out / "base"), ka=str(out / "ka"), adapter=str(out / "medcare_adapter"),
                            adapter_base=ctx.input.model_path, keep_na=p.keep_na_at_inference).record())
