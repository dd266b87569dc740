"""What `medpipe list --params` prints: every parameter of a stage kind with its default, its help
text and, for a closed set, its allowed values (the field's metadata, `medpipe.params.param`), nested
blocks (peft., medcare.) flattened."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any

from medpipe.params import choices_of, help_of


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return "???"


def nested_class(dc: type, f: dataclasses.Field) -> type | None:
    """The dataclass a field holds (also through Optional[...]), else None."""
    hint = typing.get_type_hints(dc).get(f.name)
    for t in (hint, *typing.get_args(hint)):
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            return t
    return None


def param_rows(dc: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default as YAML would read it, help) of every field, nested blocks expanded."""
    rows = []
    for f in dataclasses.fields(dc):
        inner = nested_class(dc, f)
        default = default_of(f)
        if inner is not None:
            shown = "null" if default is None else "{...}"
            rows.append((prefix + f.name, shown, help_of(f)))
            rows += param_rows(inner, prefix + f.name + ".")
        else:
            rows.append((prefix + f.name, _yaml(default), " ".join(filter(None, (help_of(f), choices_text(f))))))
    return rows


def choices_text(f: dataclasses.Field) -> str:
    """"[choices: a | b | null]" for a field with a closed set of values, else ""."""
    choices = choices_of(f)
    return f"[choices: {' | '.join(_yaml(c) if c is None else str(c) for c in choices)}]" if choices else ""


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, str) else str(value)


def params_lines(kind: str, params_cls: type) -> list[str]:
    rows = param_rows(params_cls)
    width = max(len(f"{n}={d}") for n, d, _ in rows)
    out = [f"{kind}:"]
    for name, default, text in rows:
        out.append(f"  {f'{name}={default}':<{width}}  {text}".rstrip())
    return out
