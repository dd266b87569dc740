"""A stage kind from 'another package', for the registry test: no engine change needed."""
from dataclasses import dataclass

from medpipe.stagekind import StageKind


@dataclass
class EchoParams:
    message: str = ""
    times: int = 1


class EchoStage(StageKind):
    """Prints its message (test plugin)."""

    Params = EchoParams
    trains = False

    def run(self, ctx):
        import dataclasses

        ctx.say(ctx.params.message * ctx.params.times)
        return dataclasses.replace(ctx.input, stage=ctx.name, kind=ctx.kind)
