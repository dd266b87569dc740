"""`medpipe eval RUN_DIR` and `medpipe compare RUN_DIR`: evaluation outside a recipe, on a done
stage's model; results land in `<run_dir>/eval/` (shapes in medpipe.stages.eval's docstring)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from medpipe.stages.eval import EvalParams, evaluate_all
from medpipe.stages.evaluation.runner import method_tag
from medpipe.stages.evaluation.judge import JudgeParams, judge_client

from .rundir import stage_artifact


def _run_config(run_dir: Path):
    from omegaconf import OmegaConf

    from medpipe.compose import register_resolvers

    register_resolvers()
    path = Path(run_dir) / "config.yaml"
    return OmegaConf.load(path) if path.is_file() else OmegaConf.create({})


def _named_data(value: Any, data_cfg: dict) -> Any:
    """`cmexam` → the run's `data.cmexam` entry (lists element-wise); anything else unchanged."""
    if isinstance(value, str) and value in data_cfg and not isinstance(data_cfg[value], (int, float, bool)):
        return data_cfg[value]
    if isinstance(value, list):
        return [_named_data(v, data_cfg) for v in value]
    return value


def params_from_overrides(run_dir: Path, overrides: list[str], cls: type = EvalParams) -> tuple[Any, dict]:
    """Eval params from `key=value` overrides (OmegaConf dotlist; `${data.x}` resolves against the
    run's config.yaml; a bare data name like `data=cmexam` means the run's `data.cmexam`)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from medpipe.compose import bind_params
    from medpipe.errors import ConfigError

    cfg = _run_config(run_dir)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"expected key=value overrides, got {bad[0]!r}")
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.errors import HydraException

        parsed = OverridesParser.create().parse_overrides([o.lstrip("+") for o in overrides])
    except HydraException as e:
        raise ConfigError(f"eval overrides: {str(e).splitlines()[0]}") from None
    try:
        dot = OmegaConf.create({})
        for o in parsed:
            OmegaConf.update(dot, o.key_or_group, o.value(), merge=True)
        merged = OmegaConf.merge(cfg, {"_eval_": dot})
        values = OmegaConf.to_container(merged["_eval_"], resolve=True)
        data_cfg = OmegaConf.to_container(cfg.data, resolve=True) if "data" in cfg else {}
    except OmegaConfBaseException as e:
        raise ConfigError(f"eval overrides: {str(e).splitlines()[0]}") from None
    for key in ("data", "fewshot_data"):
        if key in values:
            values[key] = _named_data(values[key], data_cfg)
    if isinstance(values.get("rag"), dict) and "index" in values["rag"]:
        values["rag"]["index"] = _named_data(values["rag"]["index"], data_cfg)
    return bind_params(cls, values, "eval"), data_cfg


def evaluate_run_stage(run_dir: str | Path, stage: str | None, overrides: list[str], say=print) -> Path | None:
    """`medpipe eval RUN_DIR --stage S key=value...`: evaluate a done stage's model and merge the
    results into `<run_dir>/eval/<S>.json` (shape in the module docstring)."""
    import dataclasses
    from datetime import datetime, timezone

    from medpipe.artifact import write_json_atomic
    
    run_dir = Path(run_dir)
    name, art = stage_artifact(run_dir, stage)
    p, data_cfg = params_from_overrides(run_dir, overrides)
    out_dir = run_dir / "eval" / name
    fresh = not out_dir.exists()
    path = run_dir / "eval" / f"{name}.json"
    try:
        metrics, results, skipped = evaluate_all(p, art, out_dir, data_cfg, say)
    except BaseException:
        if fresh:  # nothing half-written that a rerun or `report` would read
            import shutil

            shutil.rmtree(out_dir, ignore_errors=True)
            try:
                out_dir.parent.rmdir()   # eval/ itself when it holds nothing else
            except OSError:
                pass
        raise
    if skipped:  # a judge eval without judge.url: said, nothing recorded
        return None
    old = json.loads(path.read_text()) if path.is_file() else {}
    # keyed by set AND method (`cmexam@cue`, `cmexam@ppl-5shot`): another method adds a result, the
    # same set and method replace theirs; held-out figures (`heldout_text`) are one method already
    def keyed(set_name: str) -> str:
        res = results.get(set_name, {})
        if res.get("kind") == "heldout":
            return set_name
        if res.get("kind") == "pairwise":
            return f"{set_name}@judge-{p.judge.template}"
        # a `groups:` entry and lm-eval groups (multimedqa) are scored as their mcq sets are
        return f"{set_name}@{res['method'] if 'method' in res else method_tag(p, 'mcq')}"

    metrics = {f"{keyed(k.split('/', 1)[0])}/{k.split('/', 1)[1]}": v for k, v in metrics.items()}
    for set_name in results:  # the per-item details too, or another method's run would overwrite them
        details = out_dir / "details" / f"{set_name}.jsonl"
        if details.is_file() and keyed(set_name) != set_name:
            details.replace(out_dir / "details" / f"{keyed(set_name)}.jsonl")
    results = {keyed(set_name): res for set_name, res in results.items()}
    record = {"stage": name, "evaluated_stage": name, "model_path": art.model_path,
              "params": {**old.get("params", {}), **{s: dataclasses.asdict(p) for s in results}},
              "metrics": {**old.get("metrics", {}), **metrics}, "results": {**old.get("results", {}), **results},
              "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_json_atomic(path, record)
    say(f"results → {path}")
    return path


def _model_ref(run_dir: Path, ref: str) -> tuple[str, Any]:
    """`stage` (in run_dir) or `OTHER_RUN_DIR:stage` → (label, LocalModel)."""
    from medpipe.stages.inference.runtime import LocalModel

    if ":" in ref and Path(ref.rsplit(":", 1)[0]).is_dir():
        other, st = ref.rsplit(":", 1)
        name, art = stage_artifact(Path(other), st or None)
        label = f"{Path(other).name}:{name}"
    else:
        name, art = stage_artifact(run_dir, ref)
        label = name
    return label, LocalModel.from_artifact(art, name=label)


def compare_run_stages(run_dir: str | Path, a: str, b: str, judge_url: str, overrides: list[str],
                       judge_model: str | None = None, api_key_env: str | None = None, limit: int | None = None,
                       max_new_tokens: int = 128, say=print) -> Path:
    """`medpipe compare RUN_DIR --a dpo --b sft --judge-url URL data=...`: pairwise judging of two
    stages (or `--b OTHER_RUN:stage`) on chat data; writes `<run_dir>/eval/pairwise-<a>-vs-<b>.json`."""
    from medpipe.artifact import write_json_atomic
    from medpipe.errors import ConfigError
    from medpipe.data import parse_spec
    from medpipe.data.validate import read_source
    from medpipe.stages.evaluation.judge import compare

    run_dir = Path(run_dir)
    p, data_cfg = params_from_overrides(run_dir, overrides)
    if p.data is None:
        raise ConfigError("compare: give the questions as data=... (chat data, single- or multi-turn)")
    client = judge_client(JudgeParams(url=judge_url, model=judge_model, api_key_env=api_key_env,
                                      template=p.judge.template))
    say(f"judge: {client.model} at {client.base}")
    records: list[dict] = []
    for src in parse_spec(p.data):
        records += read_source(src, "chat", p.on_error or data_cfg.get("on_error") or "fail")[0]
    records = [r for r in records if any(m["role"] == "user" for m in r["messages"])]
    if limit or p.limit:
        records = records[: (limit or p.limit)]
    label_a, model_a = _model_ref(run_dir, a)
    label_b, model_b = _model_ref(run_dir, b)
    result = compare(model_a, model_b, label_a, label_b, records, client, max_new_tokens=max_new_tokens,
                     batch_size=p.batch_size, say=say, template=p.judge.template)
    safe = lambda s: re.sub(r"[^\w.+-]+", "_", s)  # noqa: E731
    path = run_dir / "eval" / f"pairwise-{safe(label_a)}-vs-{safe(label_b)}.json"
    write_json_atomic(path, result)
    say(result["line"])
    say(f"results → {path}")
    return path
