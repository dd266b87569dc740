"""The one stage entry point: a resolved stage file in, an artifact out.

The local launcher calls `run_stage_file` in-process; DeepSpeed, torchrun and accelerate start
`python -m medpipe.entry STAGE_FILE` on every rank. Either way the same code runs, and only
rank 0 writes `artifact.json` (atomically, last).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from .artifact import Artifact, record_files
from .compose import bind_params
from . import registry
from .stagekind import StageContext, process_world_size, rank

STAGE_FILE = "stage.json"


class _QuietFileHandler(logging.FileHandler):
    """A stage log that cannot be written (disk full) is not worth a traceback on the terminal:
    the stage's own error says what happened."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def _setup_log(output_dir: Path) -> logging.Logger:
    log = logging.getLogger(f"medpipe.stage.{output_dir.name}.{rank()}")
    log.setLevel(logging.INFO)
    if not log.handlers:
        (output_dir / "logs").mkdir(parents=True, exist_ok=True)
        handler = _QuietFileHandler(output_dir / "logs" / f"rank{rank()}.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
    return log


def run_stage_file(path: str | Path) -> Artifact:
    spec = json.loads(Path(path).read_text())
    output_dir = Path(spec["output_dir"])
    log = _setup_log(output_dir)
    # transformers' TensorBoard callback reads this when the trainer is built: one dir per stage
    previous_tb = os.environ.get("TENSORBOARD_LOGGING_DIR")
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(output_dir / "tensorboard")
    cls = registry.load(spec["kind"])
    ctx = StageContext(
        name=spec["name"],
        kind=spec["kind"],
        index=spec["index"],
        total=spec["total"],
        params=bind_params(cls.Params, spec["params"], f"stages.{spec['name']}"),
        input=Artifact(**spec["input"]),
        output_dir=output_dir,
        model=spec["model"],
        data=spec["data"],
        seed=spec["seed"],
        launcher=spec["launcher"],
        log=log,
    )
    log.info("stage %s (%s) rank %d/%d starting", ctx.name, ctx.kind, rank(), process_world_size())
    try:
        artifact = cls().run(ctx)
    except BaseException as e:
        if isinstance(e, OSError) or "No space left" in str(e):  # the trace would not fit a full disk
            log.error("stage %s failed on rank %d: %s", ctx.name, rank(), e)
        else:
            log.exception("stage %s failed on rank %d", ctx.name, rank())
        raise
    finally:
        if previous_tb is None:
            os.environ.pop("TENSORBOARD_LOGGING_DIR", None)
        else:
            os.environ["TENSORBOARD_LOGGING_DIR"] = previous_tb
    if ctx.is_main:
        artifact.config_hash = spec["config_hash"]
        artifact.inputs_hash = spec["inputs_hash"]
        artifact.metrics.setdefault("world_size", process_world_size())
        import time

        t0 = time.monotonic()
        record_files(artifact, output_dir, ctx.input.content_digest)
        log.info("recorded %d files (%.1f MB) in %.2fs", len(artifact.files),
                 sum(f["size"] for f in artifact.files.values()) / 1e6, time.monotonic() - t0)
        artifact.save(output_dir)
        log.info("artifact written to %s", output_dir)
    return artifact


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # the deepspeed launcher passes --local_rank=N (torchrun sets LOCAL_RANK instead)
    local = [a for a in argv if a.startswith("--local_rank") or a.startswith("--local-rank")]
    for a in local:
        if "=" in a:
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
    argv = [a for a in argv if a not in local]
    if len(argv) != 1:
        print("usage: python -m medpipe.entry STAGE_FILE", file=sys.stderr)
        return 2
    run_stage_file(argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
