"""What the reference-free preference kinds (`orpo`, `cpo`) share: the pair check and readers of
`dpo`, the train sequence (`TrainingKind`) with a TRL experimental trainer, and the last logged
preference figures as metrics. A kind names its trainer and config and its own config fields."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from medpipe.stagekind import StageContext
from medpipe.stages.training.sequence import TrainingKind


class ReferenceFreePairKind(TrainingKind):
    """TRL's experimental pair trainers (ORPO, CPO): no reference model, LoRA or full."""

    #: the trainer's logged keys kept as metrics ("rewards/accuracies" → rewards_accuracies)
    logged = ("rewards/accuracies", "rewards/margins")

    def check(self, params: Any, base: Any, data_opts: dict) -> list[str]:
        from medpipe.stages.training.preference import check_pairs

        return check_pairs(params, base, data_opts)

    def trl_classes(self) -> tuple[type, type]:
        """(config class, trainer class)."""
        raise NotImplementedError(f"{type(self).__name__}.trl_classes")

    def config_options(self, ctx: StageContext) -> dict:
        """Config fields beyond the common training ones."""
        return {}

    def arguments(self, ctx: StageContext) -> Any:
        import os

        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # before trl.experimental is imported
        from medpipe.stages.training.args import training_kwargs

        config, _ = self.trl_classes()
        p = ctx.params
        return config(**training_kwargs(ctx, p), max_length=p.max_length,
                      max_completion_length=p.max_completion_length,
                      trust_remote_code=bool(ctx.model.get("trust_remote_code", False)), **self.config_options(ctx))

    def data(self, ctx: StageContext, tok: Any, args: Any) -> Any:
        from datasets import Dataset

        from medpipe.stages.training.preference import load_rows

        rows, held, read = load_rows(ctx, ctx.params)
        return SimpleNamespace(train=Dataset.from_list(rows), heldout=Dataset.from_list(held) if held else None,
                               pairs=len(rows), read=read)

    def trainer_class(self) -> type:
        return self.trl_classes()[1]

    def metrics(self, ctx: StageContext, trainer: Any, data: Any) -> dict:
        last = next((h for h in reversed(trainer.state.log_history) if "rewards/accuracies" in h), {})
        return {k.replace("/", "_"): v for k, v in last.items() if k in self.logged}
