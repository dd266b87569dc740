"""Stage kinds whose output the test controls (for the store-trust tests): `weights` writes a
"model" whose bytes come from $MEDPIPE_TEST_WEIGHTS (so one stage key can give other weights),
`consume` records the weights it was given and counts its runs; `fail` raises what
$MEDPIPE_TEST_RAISE names (enospc, eacces, interrupt)."""
import dataclasses
import errno
import os
from dataclasses import dataclass
from pathlib import Path

from medpipe.stagekind import StageKind


@dataclass
class WeightsParams:
    size: int = 1000


class WeightsStage(StageKind):
    """Writes model/weights.bin from $MEDPIPE_TEST_WEIGHTS (test plugin)."""

    Params = WeightsParams
    trains = False

    def run(self, ctx):
        out = ctx.output_dir / "model"
        out.mkdir(parents=True, exist_ok=True)
        fill = os.environ.get("MEDPIPE_TEST_WEIGHTS", "a").encode()
        (out / "weights.bin").write_bytes((fill * ctx.params.size)[:ctx.params.size])
        (out / "config.json").write_text('{"model_type": "test"}')
        return dataclasses.replace(ctx.input, stage=ctx.name, kind=ctx.kind, format="full",
                                   model_path=str(out), tokenizer_path=str(out))


@dataclass
class ConsumeParams:
    note: str = ""


class ConsumeStage(StageKind):
    """Copies its input's weights and counts its runs in $MEDPIPE_TEST_COUNT (test plugin)."""

    Params = ConsumeParams
    trains = False

    def run(self, ctx):
        out = ctx.output_dir / "model"
        out.mkdir(parents=True, exist_ok=True)
        (out / "seen.bin").write_bytes((Path(ctx.input.model_path) / "weights.bin").read_bytes())
        counter = Path(os.environ["MEDPIPE_TEST_COUNT"])
        counter.write_text(str(int(counter.read_text() or 0) + 1) if counter.exists() else "1")
        return dataclasses.replace(ctx.input, stage=ctx.name, kind=ctx.kind, format="full",
                                   model_path=str(out), tokenizer_path=str(out))


@dataclass
class FailParams:
    note: str = ""


class FailStage(StageKind):
    """Fails the way $MEDPIPE_TEST_RAISE says (test plugin)."""

    Params = FailParams
    trains = False

    def run(self, ctx):
        what = os.environ.get("MEDPIPE_TEST_RAISE", "enospc")
        target = ctx.output_dir / "model" / "model.safetensors"
        if what == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
        if what == "wrapped":  # as safetensors/torch report it: their own type, errno text only
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError as e:
                raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from e
        if what == "torch":  # torch.save on a full disk: no errno anywhere
            try:
                raise RuntimeError("basic_ios::clear: iostream error")
            except RuntimeError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2103680 vs 2103568")
        if what == "eacces":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(target))
        raise KeyboardInterrupt
