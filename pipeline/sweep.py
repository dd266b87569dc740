"""`--multirun`: expand Hydra sweep overrides (a=1,2 / range / choice) into one override list per run."""
from __future__ import annotations

import itertools


def expand(overrides: list[str]) -> list[list[str]]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    axes: list[list[str]] = []
    for text, ov in zip(overrides, parsed):
        if ov.is_sweep_override():
            key = ov.get_key_element()
            axes.append([f"{key}={v}" for v in ov.sweep_string_iterator()])
        else:
            axes.append([text])
    return [list(combo) for combo in itertools.product(*axes)]
