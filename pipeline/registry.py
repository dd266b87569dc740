"""Plugin families, each found through its own entry-point group:

* stage kinds — group `medpipe.stages` (below);
* model sources — group `medpipe.models`: where a recipe's model comes from when `model.path` is
  not set (the embedded tiny model; a GGUF checkpoint converted once). A source is a class with
  `identity(opts) -> str` (cheap, no model is built: it keys the first stage) and
  `materialize(opts) -> str` (a plain HF model directory, built or converted once and cached).


A third-party package adds a kind by declaring an entry point in that group (or, in-process, by
`register(name, cls)`); nothing in the engine changes. A kind subclasses
`medpipe.stagekind.StageKind` (the contract: `Params`, `run(ctx)`, optional behaviours). Stage
modules keep heavy imports (torch, transformers...) inside `run`, so reading `Params` here stays
cheap for `medpipe --help`, `list` and `show`.
"""
from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import Any, Protocol

from .errors import ConfigError
from .stagekind import StageKind

GROUP = "medpipe.stages"
MODEL_GROUP = "medpipe.models"


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


_registered: dict[str, type] = {}  # kinds added in-process (register), beside the entry points


def register(name: str, cls: type) -> None:
    """Add a stage kind in this process, as an entry point would (plugins loaded by hand, tests)."""
    _registered[name] = _checked(name, cls, f"{cls.__module__}:{cls.__qualname__}")


def unregister(name: str) -> None:
    _registered.pop(name, None)


def kinds() -> list[str]:
    return sorted(set(_entry_points()) | set(_registered))


def load(kind: str) -> type[StageKind]:
    if kind in _registered:
        return _registered[kind]
    eps = _entry_points()
    if kind not in eps:
        raise ConfigError(f"unknown stage kind '{kind}'. Available kinds: {', '.join(kinds()) or '(none)'}")
    return _checked(kind, eps[kind].load(), eps[kind].value)


def _checked(kind: str, cls: Any, where: str) -> type[StageKind]:
    if not (isinstance(cls, type) and issubclass(cls, StageKind)) or not dataclasses.is_dataclass(getattr(cls, "Params", None)):
        raise ConfigError(f"stage kind '{kind}' ({where}) must subclass medpipe.stagekind.StageKind "
                          f"and define a Params dataclass")
    return cls
