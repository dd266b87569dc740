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
from medpipe.stagekind import StageKind
from medpipe.stages.adapters.settings import MedCareConfig
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


class MedCareDAStage(StageKind):
    """MedCare DA: KA + Align LoRA on FFN with the orthogonal loss; exports a plain merged model."""

    Params = MedCareDAParams
    refuses_zero3 = "its orthogonal loss needs whole weights"

    @staticmethod
    def load_for_inference(art: Any):
        """Inference hook: the keep-NA ablation loads base + KA + NA + Align; else the plain model."""
        from medpipe.stages.adapters import medcare_io

        return medcare_io.load_for_inference(art)

    def check(self, params: Any, base: Any, data_opts: dict) -> list[str]:
        from medpipe.stages.training.chat_data import check_chat_data

        return check_chat_data(params, base, data_opts)

    def run(self, ctx: Any):
        from trl import SFTConfig

        from medpipe.artifact import Artifact
        from medpipe.stages.adapters import medcare, medcare_io
        from medpipe.stages.training.args import training_kwargs
        from medpipe.stages.training.callbacks import callbacks
        from medpipe.stages.training.chat_data import prepare_chat_data
        from medpipe.stages.training.loop import data_cache_dir, load_model, load_tokenizer, train
        from medpipe.stages.training.medcare import MedCareTrainer, first_last

        p: MedCareDAParams = ctx.params
        handed = medcare_io.MedCareHandoff.of(ctx.input) or medcare_io.MedCareHandoff()
        base_path = handed.base or ctx.input.model_path
        ka = handed.ka
        if p.keep_na and not (handed.adapter and handed.ka):
            from medpipe.errors import MedpipeError

            raise MedpipeError(f"stages.{ctx.name}.keep_na: needs an MKA stage right before (its routed experts "
                               f"are kept); the input {ctx.input.stage} hands on none")
        if ka is None:
            ctx.say("no MKA before this stage: KA starts from scratch (the 'DA without MKA' ablation)")
        if p.keep_na:
            ctx.say("NA kept: MKA's routed experts and routers train on through DA (the Table 3 ablation)")
        tok = load_tokenizer(ctx, base_path)
        if p.chat_template:
            tok.chat_template = p.chat_template
        args = SFTConfig(**training_kwargs(ctx, p), max_length=p.max_length)
        # prepared once per node, as SFT's: local rank 0 encodes with the node's cores (or memory-maps
        # what `validate` cached under the same key), the other ranks wait, then memory-map it
        with args.main_process_first(local=True, desc="MedCare data"):
            data = prepare_chat_data(p, ctx.data, tok, data_cache_dir(ctx), log=ctx.log)
        train_ds = data.train
        model = medcare.inject_da(load_model(ctx, p, base_path), p.medcare, ka=ka,  # seeded: same Align init
                                  keep_na=handed.adapter if p.keep_na else None)
        trainer = MedCareTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=data.heldout,
                                 processing_class=tok,
                                 callbacks=callbacks(ctx, p), orth_lambda=p.orth_lambda)
        metrics = train(trainer, ctx)
        metrics.update(first_last(trainer.state.log_history, "orth_loss"))
        metrics.update(first_last(trainer.state.log_history, "ce_loss"))
        out = ctx.output_dir
        if trainer.is_world_process_zero():
            model = trainer.accelerator.unwrap_model(trainer.model)
            medcare_io.save_medcare(model, out / "medcare_adapter")  # KA + Align (+ NA), unmerged
            merged = medcare_io.merge_medcare(model, fold_ka=True)  # NA (keep_na) is never folded: dropped here
            merged.save_pretrained(out / "model")
            tok.save_pretrained(out / "model")
        trainer.accelerator.wait_for_everyone()
        return Artifact(stage=ctx.name, kind=ctx.kind, format="full", model_path=str(out / "model"),
                        tokenizer_path=str(out / "model"), metrics=metrics,
                        trust_remote_code=bool(ctx.model.get("trust_remote_code", False)),
                        handoff=medcare_io.MedCareHandoff(base=base_path, adapter=str(out / "medcare_adapter"),
                                                       adapter_base=base_path, keep_na=p.keep_na).record())
