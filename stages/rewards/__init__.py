"""Rewards for RL stages (`grpo`): plugins found through the entry-point group `medpipe.rewards`,
like stage kinds, combined with weights.

A recipe lists them under `stages.<name>.rewards`, each entry one dict:

    rewards:
      - {name: mcq_exact, weight: 1.0}                  # a registered reward + its options
      - {name: format, weight: 1.0, malformed: -1.0}
      - {python: "my_pkg.my_rewards:brevity", weight: 0.5}   # a user's own function

A reward plugin is a class (or factory) called with the entry's options (everything but `name`,
`weight`); the object it returns is TRL's reward callable:
`reward(prompts, completions, **columns) -> list[float | None]` (one per completion; None = not
scored, left out of the group's mean by TRL). `columns` are the dataset's columns per completion
(the grpo stage puts the gold letters in `answer`, the option letters in `letters`). Optional
methods: `start()` (called once before training: reach an endpoint, fail early), `name`
(what TRL logs, `rewards/<name>/mean`).

Light module: no torch. `problems(specs)` checks entries without building them (`validate`).
"""
from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Any, Callable

GROUP = "medpipe.rewards"
RESERVED = ("name", "python", "weight")


@lru_cache(maxsize=None)
def registered() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=GROUP)}


def problems(specs: Any) -> list[str]:
    """What is wrong with a `rewards:` list, one message per bad entry ("rewards[1].name: ...")."""
    if not isinstance(specs, (list, tuple)) or not specs:
        return ["rewards: a non-empty list of {name: ..., weight: ...} or {python: 'pkg.module:function'}"]
    out = []
    for i, spec in enumerate(specs):
        where = f"rewards[{i}]"
        if not isinstance(spec, dict):
            out.append(f"{where}: a dict like {{name: mcq_exact, weight: 1.0}}, got {spec!r}")
            continue
        if ("name" in spec) == ("python" in spec):
            out.append(f"{where}: exactly one of name (one of {', '.join(sorted(registered()))}) or "
                       f"python ('pkg.module:function')")
            continue
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            out.append(f"{where}.weight: a number, got {weight!r}")
        if "name" in spec and spec["name"] not in registered():
            out.append(f"{where}.name: unknown reward {spec['name']!r} (available: {', '.join(sorted(registered()))})")
        if "python" in spec and (not isinstance(spec["python"], str) or spec["python"].count(":") != 1):
            out.append(f"{where}.python: 'pkg.module:function', got {spec['python']!r}")
    return out


def load_python(ref: str) -> Callable:
    """`pkg.module:function` → the function (an ImportError/AttributeError becomes one line)."""
    from medpipe.errors import ConfigError

    mod_name, _, attr = ref.partition(":")
    try:
        fn = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"python reward '{ref}' cannot be loaded: {type(e).__name__}: {e}") from None
    if not callable(fn):
        raise ConfigError(f"python reward '{ref}' is not callable")
    return fn


def build(specs: list[dict], where: str = "rewards") -> tuple[list[Callable], list[float]]:
    """(reward callables, weights) from a checked `rewards:` list. Each callable's `__name__` is
    the reward's name (TRL logs `rewards/<name>/mean`); duplicates get a suffix (`format_2`)."""
    from medpipe.errors import ConfigError

    bad = problems(specs)
    if bad:
        raise ConfigError(f"{where}: " + "; ".join(bad))
    funcs, weights, seen = [], [], {}
    for i, spec in enumerate(specs):
        opts = {k: v for k, v in spec.items() if k not in RESERVED}
        if "python" in spec:
            if opts:
                raise ConfigError(f"{where}[{i}]: a python reward takes no options (got {', '.join(opts)})")
            fn, name = load_python(spec["python"]), spec["python"].rpartition(":")[2]
        else:
            name = spec["name"]
            try:
                fn = registered()[name].load()(**opts)
            except TypeError as e:
                raise ConfigError(f"{where}[{i}] ({name}): {e}") from None
            except ValueError as e:
                raise ConfigError(f"{where}[{i}] ({name}): {e}") from None
        seen[name] = seen.get(name, 0) + 1
        funcs.append(named(fn, name if seen[name] == 1 else f"{name}_{seen[name]}"))
        weights.append(float(spec.get("weight", 1.0)))
    return funcs, weights


def named(fn: Callable, name: str) -> Callable:
    """`fn` under `name` (TRL takes a callable's `__name__` as the reward's log name)."""
    def reward(prompts, completions, **columns):
        return fn(prompts=prompts, completions=completions, **columns)

    reward.__name__ = reward.__qualname__ = name
    reward.start = getattr(fn, "start", None)
    return reward
