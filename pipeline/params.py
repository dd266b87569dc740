"""How every stage kind's params are declared and checked (torch-free: the CLI reads them).

* A params class is a dataclass; each field's help text is its `metadata["help"]`
  (`field(default=..., metadata={"help": "..."})`, or `param(default, "help")`), printed by
  `medpipe list --params`.
* Value ranges: a params class derives from `Checked` and lists `(field, holds, what is required)`
  in `_rules()`; binding (compose time, before anything trains) runs them and reports every
  failing field in one error. Nested params (`peft:`, `spike_guard:`) check themselves and are
  named with their `_where` prefix.
"""
from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, ClassVar


def param(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None) -> Any:
    """A params field with its help text (`factory` for mutable defaults)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def help_of(f: dataclasses.Field) -> str:
    return str(f.metadata.get("help", "")) if f.metadata else ""


class Checked:
    """Range checks on construction (binding a stage's params runs them before anything trains):
    `_rules()` yields (field, holds, what is required); a failure names every bad field."""

    def _rules(self) -> list[tuple[str, bool, str]]:
        return []

    _where: ClassVar[str] = ""  # the field a nested params class sits in (peft., spike_guard.)

    def __post_init__(self) -> None:
        bad = [f"{self._where}{name} must be {want}, got {getattr(self, name)!r}"
               for name, ok, want in self._rules() if not ok]
        if bad:
            raise ValueError("; ".join(bad))
