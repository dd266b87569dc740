"""Stage kinds, found through the `medpipe.stages` entry-point group.

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


@lru_cache(maxsize=1)
def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=GROUP)}


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
