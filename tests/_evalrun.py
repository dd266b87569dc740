"""Helpers for the eval/serve/report tests: a run dir whose stages are the tiny model (no training)."""
from __future__ import annotations

import json
from pathlib import Path

from medpipe.artifact import Artifact, write_json_atomic
from medpipe.stages.models.tiny import ensure_tiny


def fake_run(root: Path, stages=("cpt", "sft", "dpo"), history: bool = True) -> Path:
    """runs/main with done stages that all point at the tiny model; log_history.jsonl per stage
    (losses falling; DPO with reward margins) so the report has curves to draw."""
    tiny = str(ensure_tiny())
    run_dir = root / "main"
    run_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, name in enumerate(stages):
        sdir = root / ".store" / f"{name}-{i:016x}"
        sdir.mkdir(parents=True, exist_ok=True)
        metrics = {"first_loss": 8.0 - i, "last_loss": 7.0 - i, "tokens_seen": 1000 * (i + 1)}
        if name == "dpo":
            metrics.update(reward_accuracy=0.9, reward_margin=0.4)
        Artifact(stage=name, kind=name, format="full", model_path=tiny, tokenizer_path=tiny, metrics=metrics).save(sdir)
        write_json_atomic(sdir / "status.json", {"state": "done", "elapsed": 12.0 + i})
        if history:
            with open(sdir / "log_history.jsonl", "w") as f:
                for step in range(2, 12, 2):
                    row = {"step": step, "loss": 8.0 - i - step / 10, "learning_rate": 1e-3}
                    if name == "dpo":
                        row.update({"rewards/margins": step / 20, "rewards/accuracies": min(1.0, step / 8)})
                    f.write(json.dumps(row) + "\n")
        link = f"{i + 1:02d}-{name}"
        (run_dir / link).symlink_to(sdir)
        entries.append({"name": name, "kind": name, "link": link, "store_dir": str(sdir), "key": f"{i:016x}"})
    write_json_atomic(run_dir / "run.json", {"name": "fake", "recipe": "fake", "created": "2026-01-01T00:00:00",
                                             "stages": entries})
    (run_dir / "config.yaml").write_text(
        "name: fake\ndata:\n  on_error: fail\n"
        f"  cmexam: {{path: {samples()}/mcq_cmexam.csv, format: cmexam}}\n"
        f"  pretrain: {samples()}/pretrain.jsonl\n"
        "stages:\n  cpt: {kind: cpt, data: " + f"{samples()}/pretrain.jsonl" + "}\n")
    return run_dir


def samples() -> str:
    from medpipe.compose import package_dir

    return str(package_dir("samples"))


def tiny_artifact() -> Artifact:
    tiny = str(ensure_tiny())
    return Artifact(stage="base", kind="model", format="full", model_path=tiny, tokenizer_path=tiny)
