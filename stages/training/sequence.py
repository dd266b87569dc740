"""The train sequence, written once: tokenizer → arguments → data (records, encoded) → model →
trainer → train → metrics → save.

`TrainingKind.run` runs it; a kind that trains on one dataset subclasses `TrainingKind` (chat data:
`ChatTrainingKind`) and overrides only the steps where it differs — its trainer class, its model
wrapping, its extra metrics, its save. Each step gets the stage context and what the steps before
it made; `data` returns whatever the kind needs later, as long as it has `train` and `heldout`.

Light at import (the CLI imports the kinds to read their `Params`): torch, transformers and TRL
are imported inside the steps.
"""
from __future__ import annotations

from typing import Any

from medpipe.artifact import Artifact
from medpipe.stagekind import StageContext, StageKind


class TrainingKind(StageKind):
    """A stage kind whose `run` is the train sequence; the steps below are its defaults."""

    def run(self, ctx: StageContext) -> Artifact:
        from medpipe.stages.training.callbacks import callbacks
        from medpipe.stages.training.loop import train

        tok = self.tokenizer(ctx)
        args = self.arguments(ctx)
        data = self.data(ctx, tok, args)
        model = self.model(ctx, data)  # load_model seeds first: the same adapter init in any process
        trainer = self.trainer_class()(model=model, args=args, train_dataset=data.train, eval_dataset=data.heldout,
                                       processing_class=tok, callbacks=callbacks(ctx, ctx.params),
                                       **self.trainer_options(ctx, data))
        del model  # the trainer holds it; `finish` runs with both released
        metrics = train(trainer, ctx)
        metrics.update(self.metrics(ctx, trainer, data))
        artifact = self.save(ctx, trainer, tok, data, metrics)
        del trainer
        return self.finish(ctx, tok, data, artifact)

    def model_dir(self, ctx: StageContext) -> str | None:
        """The model (and tokenizer) this stage trains on; None: the input artifact's."""
        return None

    def tokenizer(self, ctx: StageContext) -> Any:
        from medpipe.stages.training.loop import load_tokenizer

        return load_tokenizer(ctx, self.model_dir(ctx))

    def arguments(self, ctx: StageContext) -> Any:
        from transformers import TrainingArguments

        from medpipe.stages.training.args import training_kwargs

        return TrainingArguments(**training_kwargs(ctx, ctx.params))

    def data(self, ctx: StageContext, tok: Any, args: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__}.data")

    def model(self, ctx: StageContext, data: Any) -> Any:
        """The input model with LoRA when the stage's `peft` is set (full fine-tuning otherwise)."""
        from medpipe.stages.training.loop import apply_lora, load_model

        return apply_lora(load_model(ctx, ctx.params, self.model_dir(ctx)), ctx.params.peft)

    def trainer_class(self) -> type:
        from transformers import Trainer

        return Trainer

    def trainer_options(self, ctx: StageContext, data: Any) -> dict:
        """Keyword arguments the kind's trainer takes beyond the common ones."""
        return {}

    def metrics(self, ctx: StageContext, trainer: Any, data: Any) -> dict:
        """The kind's own metrics, added to the training loop's."""
        return {}

    def save(self, ctx: StageContext, trainer: Any, tok: Any, data: Any, metrics: dict) -> Artifact:
        """The trained model (LoRA: the adapter, merged for the next stage) and its artifact."""
        from medpipe.stages.training.loop import save_result

        return save_result(ctx, trainer, tok, ctx.params, metrics)

    def finish(self, ctx: StageContext, tok: Any, data: Any, artifact: Artifact) -> Artifact:
        """Work after the trainer (and the trained model in it) is released, e.g. merged exports."""
        return artifact


class ChatTrainingKind(TrainingKind):
    """The sequence on chat data (`medpipe.stages.training.chat_data`): the tokenizer's template
    overridable by `chat_template`, a TRL `SFTConfig`, the data encoded once per node."""

    data_desc = "chat data"  # names the wait of the other ranks in the log

    def check(self, params: Any, base: Any, data_opts: dict) -> list[str]:
        from medpipe.stages.training.chat_data import check_chat_data

        return check_chat_data(params, base, data_opts)

    def tokenizer(self, ctx: StageContext) -> Any:
        tok = super().tokenizer(ctx)
        if ctx.params.chat_template:
            tok.chat_template = ctx.params.chat_template
        return tok

    def arguments(self, ctx: StageContext) -> Any:
        from trl import SFTConfig

        from medpipe.stages.training.args import training_kwargs

        return SFTConfig(**training_kwargs(ctx, ctx.params), max_length=ctx.params.max_length,
                         **self.config_options(ctx))

    def config_options(self, ctx: StageContext) -> dict:
        """SFTConfig fields beyond the common ones and max_length."""
        return {}

    def data(self, ctx: StageContext, tok: Any, args: Any) -> Any:
        from medpipe.stages.training.chat_data import prepare_chat_data
        from medpipe.stages.training.loop import data_cache_dir

        # prepared once per node: local rank 0 encodes with the node's cores (or memory-maps what
        # `validate` cached under the same key), the other ranks wait, then memory-map it
        with args.main_process_first(local=True, desc=self.data_desc):
            return prepare_chat_data(ctx.params, ctx.data, tok, data_cache_dir(ctx), log=ctx.log)

    def trainer_class(self) -> type:
        from trl import SFTTrainer

        return SFTTrainer
