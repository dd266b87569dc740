"""What the two MedCare kinds (`medcare_mka`, `medcare_da`) share as stage kinds: chat data, the
`MedCareTrainer` (its extra loss terms, adapter-only checkpoints), no ZeRO-3, and the inference hook
that loads the keep-NA ablation. Light at import, as the kinds are."""
from __future__ import annotations

from typing import Any

from medpipe.stages.training.sequence import ChatTrainingKind


class MedCareKind(ChatTrainingKind):
    data_desc = "MedCare data"

    @staticmethod
    def load_for_inference(art: Any):
        """Inference hook: the keep-NA ablation loads the routed experts too; else the plain model."""
        from medpipe.stages.adapters import medcare_io

        return medcare_io.load_for_inference(art)

    def trainer_class(self) -> type:
        from medpipe.stages.training.medcare import MedCareTrainer

        return MedCareTrainer

    @staticmethod
    def artifact(ctx: Any, metrics: dict, handoff: Any):
        """A MedCare stage's artifact: the plain model it saved in `model/`, and its hand-off."""
        from medpipe.artifact import Artifact

        out = str(ctx.output_dir / "model")
        return Artifact(stage=ctx.name, kind=ctx.kind, format="full", model_path=out, tokenizer_path=out,
                        metrics=metrics, trust_remote_code=bool(ctx.model.get("trust_remote_code", False)),
                        handoff=handoff.record())
