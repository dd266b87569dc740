"""Plugin families, each found through its own entry-point group:

* stage kinds — group `medpipe.stages` (below);
* model sources — group `medpipe.models`: where a recipe's model comes from when `model.path` is
  not set (the embedded tiny model; a GGUF checkpoint converted once). A source is a class with
  `identity(opts) -> str` (cheap, no model is built: it keys the first stage) and
  `materialize(opts) -> str` (a plain HF model directory, built or converted once and cached).


A third-party package adds a kind by declaring an entry point in that group; nothing in the
engine changes. A kind is a class with a `Params` dataclass and a `run(ctx) -> Artifact` method
(see `Stage`). Stage modules keep heavy imports (torch, transformers...) inside `run`, so reading
`Params` here stays cheap for `medpipe --help`, `list` and `show`.
"""
from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import Any, Protocol, runtime_checkable

from .errors import ConfigError

GROUP = "medpipe.stages"
MODEL_GROUP = "medpipe.models"


@runtime_checkable
class Stage(Protocol):
    """What the engine needs from a stage kind.

    Optional class attributes the engine reads:
    - `wants_adapter` (bool): receive the previous LoRA stage's adapter instead of a merged model.
    - `trains` (bool, default True): whether the stage goes through the launcher (eval does not).
    - `check(self, params, ctx) -> list[str]`: validate data before the first stage trains;
      returns human-readable summary lines, raises MedpipeError on broken input.
    """

    Params: type

    def run(self, ctx: Any) -> Any: ...


class ModelSource(Protocol):
    """Where a model directory comes from (see the module docstring)."""

    def identity(self, opts: dict) -> str: ...

    def materialize(self, opts: dict) -> str: ...


@lru_cache(maxsize=None)
def _entry_points(group: str = GROUP) -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=group)}


def model_source(name: str) -> ModelSource:
    eps = _entry_points(MODEL_GROUP)
    if name not in eps:
        raise ConfigError(f"model.source: unknown source '{name}' (available: {', '.join(sorted(eps)) or '(none)'}; "
                          f"or set model.path to a checkpoint directory)")
    return eps[name].load()()


def kinds() -> list[str]:
    return sorted(_entry_points())


def load(kind: str) -> type:
    eps = _entry_points()
    if kind not in eps:
        raise ConfigError(f"unknown stage kind '{kind}'. Available kinds: {', '.join(sorted(eps)) or '(none)'}")
    cls = eps[kind].load()
    if not dataclasses.is_dataclass(getattr(cls, "Params", None)) or not callable(getattr(cls, "run", None)):
        raise ConfigError(f"stage kind '{kind}' ({eps[kind].value}) must define a Params dataclass and run(ctx)")
    return cls


def param_fields(cls: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls.Params))
