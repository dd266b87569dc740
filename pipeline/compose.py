"""Compose a recipe with Hydra's compose API, then bind every stage to its kind's Params dataclass.

Search path: the recipe's own directory (primary config), conf/ (groups: model, data, stage,
launcher, deepspeed) and recipes/ (per-recipe profiles). Each stage kind's Params defaults are
registered in Hydra's ConfigStore as `stage/<kind>_params`, so `conf/stage/<kind>.yaml` only has to
pull them in and every parameter can be overridden from the command line; Hydra rejects unknown
keys, and binding to the dataclass rejects wrong types, both naming the key.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from . import registry
from .errors import ConfigError

BASE = "base"  # `from: base`: the recipe's model (a stage after a base-model eval trains on the model itself)


def package_dir(name: str) -> Path:
    return Path(str(resources.files(f"medpipe.{name}")))


def bundled_recipes() -> list[str]:
    return sorted(p.stem for p in package_dir("recipes").glob("*.yaml"))


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (package_dir("conf") / group).glob("*.yaml"))


def locate_recipe(recipe: str) -> tuple[Path, str]:
    path = Path(recipe).expanduser()
    if recipe.endswith((".yaml", ".yml")) or path.is_file() or "/" in recipe:
        if not path.is_file():
            raise ConfigError(f"recipe file '{recipe}' does not exist")
        return path.resolve().parent, path.stem
    if (package_dir("recipes") / f"{recipe}.yaml").is_file():
        return package_dir("recipes"), recipe
    raise ConfigError(
        f"unknown recipe '{recipe}'. Available recipes: {', '.join(bundled_recipes())} (or a path to a .yaml file)"
    )


def _register_stage_defaults() -> None:
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for kind in registry.kinds():
        cls = registry.load(kind)
        defaults = {"kind": kind, "from": None, **_dataclass_defaults(cls.Params)}
        store.store(group="stage", name=f"{kind}_params", node=defaults)


def _dataclass_defaults(dc: type) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(dc), resolve=False)


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("medpipe"):
        # ${medpipe:samples} -> absolute path of a bundled package folder (sample data, conf files).
        OmegaConf.register_new_resolver("medpipe", lambda name: str(package_dir(name)))


def compose(recipe: str, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Return (composed DictConfig without the hydra node, the group choices Hydra made)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    config_dir, name = locate_recipe(recipe)
    register_resolvers()
    _register_stage_defaults()
    search = f"hydra.searchpath=[file://{package_dir('conf')},file://{package_dir('recipes')}]"
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None, job_name="medpipe"):
            cfg = hydra_compose(config_name=name, overrides=[search, *overrides], return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_explain(e, recipe)) from None
    except Exception as e:  # noqa: BLE001 - a YAML syntax error surfaces as yaml's own error types
        yaml_error = _yaml_error(e)
        if yaml_error is None:
            raise
        raise ConfigError(yaml_error) from None
    choices = dict(cfg.hydra.runtime.choices)
    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]
    OmegaConf.set_struct(cfg, True)
    if OmegaConf.is_missing(cfg, "name") or "stages" not in cfg or not cfg.stages:
        raise ConfigError(f"recipe '{recipe}' must set `name` and at least one entry under `stages`")
    check_recipe_keys(cfg)
    _absolute_run_paths(cfg)
    return cfg, {k: v for k, v in choices.items() if not k.startswith("hydra/")}


def _absolute_run_paths(cfg: Any) -> None:
    """run.root, run.store and run.dir as absolute paths, resolved once against the working directory
    of this command: every path the run records then finds its files from any other directory."""
    import os

    run = cfg.get("run")
    if run is None:
        return
    for key in ("root", "store", "dir"):
        value = run.get(key)
        if isinstance(value, str) and value:
            run[key] = os.path.abspath(os.path.expanduser(value))


def _yaml_error(e: Exception) -> str | None:
    """`file:line:column: YAML syntax: problem` for a YAML error (Hydra lets them through)."""
    import yaml

    if not isinstance(e, yaml.YAMLError):
        return None
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    if mark is None:
        return f"YAML syntax: {problem}"
    return f"{mark.name}:{mark.line + 1}:{mark.column + 1}: YAML syntax: {problem}"


# ---- strict recipe keys ------------------------------------------------------------------------
TOP_KEYS = ("name", "seed", "run", "model", "data", "stages", "launcher", "deepspeed")
MODEL_KEYS = ("name", "path", "source", "trust_remote_code", "dtype", "attn_implementation", "allow_hub", "revision",
              "gguf_file",  # gguf_file: stages/models/gguf.py (sources gguf, smollm2)
              "vllm_gpu_memory_utilization", "vllm_max_model_len")  # eval backend=vllm (stages/inference/backends.py)
DATA_OPTIONS = ("on_error", "seed", "cache_dir", "overlength", "root")  # the rest of `data:` are named sources


def _group_keys(group: str) -> set[str]:
    """Every top-level key some conf/<group>/*.yaml declares (a model source's own block, e.g. `tiny:`)."""
    import yaml

    keys: set[str] = set()
    for p in (package_dir("conf") / group).glob("*.yaml"):
        try:
            body = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            continue
        keys.update(str(k) for k in body if isinstance(body, dict))
    return keys


def _base_yaml() -> dict:
    import yaml

    try:
        return yaml.safe_load((package_dir("conf") / "base.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _reject(where: str, unknown: str, allowed) -> None:
    import difflib

    allowed = sorted(set(allowed))
    near = difflib.get_close_matches(unknown, allowed, n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    raise ConfigError(f"{where}{unknown}: unknown key{hint}. Allowed: {', '.join(allowed)}")


def check_recipe_keys(cfg: Any) -> None:
    """Unknown keys at the top level and in model / data / run / launcher / deepspeed are errors
    naming the key and what is allowed (stage keys are checked by bind_params)."""
    import difflib

    base = _base_yaml()
    top = set(TOP_KEYS) | {str(k) for k in base if k != "defaults"}
    for key in cfg:
        if key not in top:
            _reject("", str(key), top)
    run_keys = {"root", "dir", "store"} | set((base.get("run") or {}).keys())
    sections = {"model": set(MODEL_KEYS) | _group_keys("model"), "run": run_keys,
                "launcher": _group_keys("launcher"), "deepspeed": _group_keys("deepspeed")}
    for section, allowed in sections.items():
        body = cfg.get(section)
        if body is None or not hasattr(body, "keys"):
            continue
        for key in body.keys():
            if key not in allowed:
                _reject(f"{section}.", str(key), allowed)
    data = cfg.get("data")
    if data is not None and hasattr(data, "keys"):
        for key in data.keys():
            key = str(key)
            if key in DATA_OPTIONS:
                continue
            value = data._get_node(key)._value() if hasattr(data, "_get_node") else data[key]
            if isinstance(value, (bool, int, float)) or value is None or \
                    difflib.get_close_matches(key, DATA_OPTIONS, n=1, cutoff=0.75):
                _reject("data.", key, [*DATA_OPTIONS, "<name>: a data source (path, {path: ...} or a list)"])
    check_reference(cfg)
    run = cfg.get("run")
    run_dir = run.get("dir") if run is not None else None
    if run_dir and Path(str(run_dir)).expanduser().exists() and not Path(str(run_dir)).expanduser().is_dir():
        raise ConfigError(f"run.dir: '{run_dir}' is a file, not a directory; choose another run.dir")


REFERENCE_KEYS = ("table", "row", "stage", "column", "value", "metric", "data", "quote")  # conf/base.yaml `reference`


def check_reference(cfg: Any) -> None:
    """`reference:` is a list of the paper's values: {table, row, column, value (a number), stage?,
    metric?, data?, quote?}; anything else is an error naming the entry and key. A `stage` the
    recipe lacks (dropped with ~stages.X) is no error: the report lists that value as not measured."""
    from omegaconf import OmegaConf

    refs = cfg.get("reference")
    if refs is None:
        return
    refs = OmegaConf.to_container(refs, resolve=True) if OmegaConf.is_config(refs) else refs
    if not isinstance(refs, list):
        raise ConfigError("reference: a list of {table, row, column, value, stage, metric, data} entries")
    for i, ref in enumerate(refs):
        if not isinstance(ref, dict):
            raise ConfigError(f"reference[{i}]: an entry is a mapping {{table, row, column, value, ...}}")
        for key in ref:
            if key not in REFERENCE_KEYS:
                _reject(f"reference[{i}].", str(key), REFERENCE_KEYS)
        for key in ("table", "row", "column", "value"):
            if ref.get(key) is None:
                raise ConfigError(f"reference[{i}].{key}: required")
        if isinstance(ref["value"], bool) or not isinstance(ref["value"], (int, float)):
            raise ConfigError(f"reference[{i}].value: a number as the paper prints it, got {ref['value']!r}")


def _explain(e: Exception, recipe: str) -> str:
    msg = str(e).strip()
    m = re.search(r"Could not override '([^']+)'", msg)
    if m:
        return f"unknown key '{m.group(1)}' in overrides (it does not exist in recipe '{recipe}'; " \
               f"see `medpipe show recipe={recipe}` for the keys, or add a new one with +{m.group(1)}=...)"
    m = re.search(r"Could not find '([^']+)'", msg)
    if m:
        group = m.group(1).split("/")[0]
        opts = group_options(group) if (package_dir("conf") / group).is_dir() else []
        return f"no config '{m.group(1)}'" + (f"; available {group} options: {', '.join(opts)}" if opts else "")
    return msg.splitlines()[0] if msg else type(e).__name__


@dataclass
class StagePlan:
    index: int
    name: str
    kind: str
    source: str | None  # stage whose artifact is the input; None = the recipe's model
    params: Any  # the kind's Params dataclass instance
    raw: dict  # resolved params as plain data (for hashing, show and the stage file)
    cls: type


def bind_stages(cfg: Any) -> list[StagePlan]:
    """Resolve and type-check every stage; errors name the stage and key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    plans: list[StagePlan] = []
    names: list[str] = []
    try:
        stages = OmegaConf.to_container(cfg.stages, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve stages: {e}".splitlines()[0]) from None
    for index, (name, body) in enumerate(stages.items()):
        if not isinstance(body, dict) or "kind" not in body:
            raise ConfigError(f"stages.{name}: every stage needs a `kind` (one of: {', '.join(registry.kinds())})")
        body = dict(body)
        kind = body.pop("kind")
        source = body.pop("from", None)
        if source == BASE and BASE not in names:
            plans.append(_bind(index, name, kind, None, body))
            names.append(name)
            continue
        if source is not None and source not in names:
            before = ", ".join(names) or "none: it is the first stage"
            raise ConfigError(f"stages.{name}.from: '{source}' is not an earlier stage (earlier stages: {before})")
        if source is None and names:
            source = names[-1]
        plans.append(_bind(index, name, kind, source, body))
        names.append(name)
    return plans


def _bind(index: int, name: str, kind: str, source: str | None, body: dict) -> StagePlan:
    cls = registry.load(kind)
    params = bind_params(cls.Params, body, f"stages.{name}")
    return StagePlan(index, name, kind, source, params, dataclasses.asdict(params), cls)


def bind_params(dc: type, values: dict, where: str) -> Any:
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

    allowed = [f.name for f in dataclasses.fields(dc)]
    for key in values:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown parameter '{key}'. Allowed: {', '.join(allowed)}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(dc), values)
        return OmegaConf.to_object(merged)
    except ConfigKeyError as e:
        key = _key_of(e)
        allowed_here = ", ".join(_nested_fields(dc, key.split(".")[:-1]))
        raise ConfigError(f"{where}.{key}: unknown parameter. Allowed: {allowed_here}") from None
    except MissingMandatoryValue as e:
        raise ConfigError(f"{where}.{_key_of(e)}: a value is required") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}.{_key_of(e)}: {_first_line(e)}") from None
    except ValueError as e:  # a range check of the params dataclass (medpipe.params.Checked)
        raise ConfigError(f"{where}: {e}") from None


def _nested_fields(dc: type, path: list[str]) -> list[str]:
    """Field names of the (nested) dataclass at `path` inside `dc`."""
    import typing

    for name in path:
        hints = typing.get_type_hints(dc)
        hint = hints.get(name)
        args = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)] if hint else []
        dc = hint if dataclasses.is_dataclass(hint) else (args[0] if args else dc)
    return [f.name for f in dataclasses.fields(dc)]


def _key_of(e: Exception) -> str:
    return str(getattr(e, "full_key", "") or getattr(e, "key", "") or "?")


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0]
