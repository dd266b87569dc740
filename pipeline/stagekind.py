"""The contract between the engine and a stage kind, in code: every kind subclasses `StageKind`.

A kind declares its `Params` dataclass and implements `run(ctx) -> Artifact`; everything else is an
optional behaviour with a default here, so the engine and the commands read it directly and a new
kind overrides only what it changes:

* `check(params, base, data_opts) -> list[str]` — validate the stage's data before the first stage
  trains (raise DataError/MedpipeError on broken input); the lines are printed as its data summary.
* `trains` — False: never sent through a distributed launcher (eval, VoC labelling run in-process).
* `evaluates` — True: scores another stage's model (reports join its metrics to that stage's row;
  chat/serve/eval pick a stage that trains instead).
* `corpus_field` — the param holding a text corpus (`medpipe chat/serve --rag` index it by default).
* `refuses_zero3` — why the kind cannot train under DeepSpeed ZeRO-3 (partitioned weights); None: it can.
  `validate`/`run` refuse `deepspeed=zero3*` for it with one line naming the reason (medpipe.memplan).
* `load_for_inference(art)` — build the model inference should use for this kind's artifact (e.g.
  MedCare's keep-NA ablation); None: the plain model directory.

`StageContext` is what `run` receives. `rank()` and `process_world_size()` read the environment the
launcher set on every rank (the planned world size of a launcher is `medpipe.launch.planned_world_size`).
Stage modules keep heavy imports (torch, transformers) inside `run`/`check`: the CLI imports them to
read `Params`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from . import console
from .artifact import Artifact


def rank() -> int:
    """This process's global rank (the launcher sets RANK on every rank; 0 in-process)."""
    return int(os.environ.get("RANK", "0"))


def process_world_size() -> int:
    """Ranks of this training process group, as the launcher set WORLD_SIZE (1 in-process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class StageContext:
    """Everything a stage may use. Stages never learn which stage came before them."""

    name: str
    kind: str
    index: int  # 0-based position in the recipe
    total: int
    params: Any  # the kind's Params dataclass instance
    input: Artifact  # the model to start from (merged when the upstream handed on an adapter)
    output_dir: Path
    model: dict  # the recipe's model options (trust_remote_code, dtype, ...)
    data: dict  # the recipe's global data options (on_error, cache_dir, ...)
    seed: int
    launcher: dict  # launcher options + `deepspeed_config` (path) when DeepSpeed is on
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("medpipe.stage"))

    @property
    def is_main(self) -> bool:
        return rank() == 0

    @property
    def deepspeed_config(self) -> str | None:
        return self.launcher.get("deepspeed_config")

    def say(self, message: str) -> None:
        """A progress line on the terminal (rank 0 only) and in the stage log."""
        self.log.info(message)
        if self.is_main:
            console.say(f"{self.index + 1}/{self.total} {self.name}", message)

    def progress(self, step: int, total: int, **values: float) -> None:
        """The stage's one progress display (rank 0 only; medpipe.console)."""
        if self.is_main:
            console.progress(f"{self.index + 1}/{self.total} {self.name}", step, total, **values)


class StageKind:
    """Base class of every stage kind (see the module docstring for each behaviour)."""

    Params: ClassVar[type]  # a dataclass; its defaults are the kind's Hydra defaults
    trains: ClassVar[bool] = True
    evaluates: ClassVar[bool] = False
    corpus_field: ClassVar[str | None] = None
    refuses_zero3: ClassVar[str | None] = None

    def run(self, ctx: StageContext) -> Artifact:
        raise NotImplementedError(f"{type(self).__name__}.run")

    def check(self, params: Any, base: Artifact, data_opts: dict) -> list[str]:
        return []

    @staticmethod
    def load_for_inference(art: Artifact) -> Any:
        return None
