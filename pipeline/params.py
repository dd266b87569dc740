"""How every stage kind's params are declared and checked (torch-free: the CLI reads them).

* A params class is a dataclass; each field's help text is its `metadata["help"]`
  (`field(default=..., metadata={"help": "..."})`, or `param(default, "help")`), printed by
  `medpipe list --params`.
* Allowed values: `param(default, "help", choices=(...))` (None among them: null allowed). A
  `Checked` params class checks them on construction and `medpipe list` prints them: one place.
  (The field's type stays `str`: OmegaConf 2.3 structured configs reject `typing.Literal`.)
* Value ranges: a params class derives from `Checked` and lists `(field, holds, what is required)`
  in `_rules()`; binding (compose time, before anything trains) runs them and reports every
  failing field in one error. Nested params (`peft:`, `spike_guard:`) check themselves and are
  named with their `_where` prefix.
* A params class that only changes a base field's default says so in `changed_defaults`
  (`changed_defaults = {"lr": 1e-4}`): the field keeps the base's type, help and choices, and its
  place in the field order — nothing is written twice.
"""
from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, ClassVar


def param(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None,
          choices: tuple | None = None) -> Any:
    """A params field with its help text (`factory` for mutable defaults) and, for a closed set of
    values, its `choices` (checked by `Checked`, printed by `medpipe list`)."""
    meta = {"help": help} if choices is None else {"help": help, "choices": tuple(choices)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def help_of(f: dataclasses.Field) -> str:
    return str(f.metadata.get("help", "")) if f.metadata else ""


def choices_of(f: dataclasses.Field) -> tuple | None:
    return f.metadata.get("choices") if f.metadata else None


def describe_choices(choices: tuple) -> str:
    """"one of a, b, c" (+ " or null" when None is allowed): the words of the error and of `list`."""
    named = ", ".join(str(c) for c in choices if c is not None)
    return f"one of {named}" + (" or null" if None in choices else "")


class Checked:
    """Range checks on construction (binding a stage's params runs them before anything trains):
    `_rules()` yields (field, holds, what is required); a failure names every bad field."""

    def _rules(self) -> list[tuple[str, bool, str]]:
        return []

    _where: ClassVar[str] = ""  # the field a nested params class sits in (peft., spike_guard.)
    changed_defaults: ClassVar[dict] = {}  # {base field: its new default} (see the module docstring)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # runs before @dataclass reads the class: each changed default becomes this class's own
        # field with the base field's type and metadata, so the dataclass machinery does the rest
        super().__init_subclass__(**kwargs)
        changed = cls.__dict__.get("changed_defaults")
        if not changed:
            return
        import copy
        import typing

        base = next(b for b in cls.__mro__[1:] if dataclasses.is_dataclass(b))
        inherited = {f.name: f for f in dataclasses.fields(base)}
        hints = typing.get_type_hints(base)
        for name, value in changed.items():
            if name not in inherited:
                raise TypeError(f"{cls.__name__}.changed_defaults: '{name}' is not a field of {base.__name__}")
            cls.__annotations__[name] = hints[name]
            if isinstance(value, (list, dict)):
                setattr(cls, name, field(default_factory=lambda v=value: copy.deepcopy(v),
                                         metadata=inherited[name].metadata))
            else:
                setattr(cls, name, field(default=value, metadata=inherited[name].metadata))

    def _choice_rules(self) -> list[tuple[str, bool, str]]:
        return [(f.name, getattr(self, f.name) in choices, describe_choices(choices))
                for f in dataclasses.fields(self) if (choices := choices_of(f)) is not None]

    def __post_init__(self) -> None:
        bad = [f"{self._where}{name} must be {want}, got {getattr(self, name)!r}"
               for name, ok, want in self._choice_rules() + self._rules() if not ok]
        if bad:
            raise ValueError("; ".join(bad))


class GlobalBatch:
    """Params whose `batch_size` is the global batch, split over the launcher's ranks: the engine
    checks the layout before launch and `medpipe show` prints it (TrainParams implements both)."""

    def batch_layout(self, world_size: int) -> tuple[int, int]:
        """(per-device micro batch, accumulation steps); ValueError when the batch does not divide."""
        raise NotImplementedError

    def describe_batch(self, world_size: int) -> str:
        raise NotImplementedError
