"""`medpipe` command line. Only typer is imported at start-up; each command imports what it needs
(Hydra/OmegaConf for composition, torch & co. only in the commands that train)."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Annotated, Any, Optional

import typer

app = typer.Typer(
    help="Declarative multi-stage training pipelines for medical LLMs.\n\n"
    "Example: medpipe run recipe=qilin stages.sft.lr=1e-4 model=tiny",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Overrides = Annotated[Optional[list[str]], typer.Argument(help="recipe=NAME|PATH and Hydra overrides (a.b=1, +new=1, ~key, model=NAME)")]


def _console():
    from rich.console import Console

    return Console(highlight=False)


def _split(args: list[str] | None) -> tuple[str, list[str]]:
    from medpipe.errors import ConfigError

    args = list(args or [])
    recipes = [a for a in args if a.startswith("recipe=")]
    if not recipes:
        from medpipe.compose import bundled_recipes

        raise ConfigError(f"missing recipe=NAME (available: {', '.join(bundled_recipes())}, or recipe=path/to.yaml)")
    return recipes[-1].split("=", 1)[1], [a for a in args if not a.startswith("recipe=")]


def _user_errors() -> tuple[type, ...]:
    """Errors a user can fix: printed as one line, exit code 2, no traceback."""
    from medpipe.errors import MedpipeError
    from medpipe.data import DataError

    return (MedpipeError, DataError)


def _fail(e: Exception) -> None:
    print(f"medpipe: error: {e}", file=sys.stderr)
    raise typer.Exit(2)


@dataclass
class Loaded:
    """A recipe composed and every stage bound: what `show` and `validate` start from."""

    recipe: str
    overrides: list[str]
    cfg: Any  # the composed DictConfig
    choices: dict  # the config-group options Hydra picked (model=tiny, ...)
    plans: list  # one medpipe.compose.StagePlan per stage


def _load(args: list[str] | None) -> Loaded:
    from medpipe.compose import bind_stages, compose

    recipe, overrides = _split(args)
    cfg, choices = compose(recipe, overrides)
    return Loaded(recipe, overrides, cfg, choices, bind_stages(cfg))


@app.command()
def run(
    args: Overrides = None,
    force: Annotated[bool, typer.Option("--force", help="retrain every stage (previous results are kept aside)")] = False,
    from_stage: Annotated[Optional[str], typer.Option("--from", help="retrain this stage and every later one")] = None,
    only: Annotated[Optional[str], typer.Option("--only", help="run just this stage (its input must be done)")] = None,
    multirun: Annotated[bool, typer.Option("--multirun", "-m", help="sweep: a=1,2 runs one pipeline per value")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show the libraries' output too (else it goes to each stage's launcher.log)")] = False,
) -> None:
    """Run every stage of a recipe in order, skipping stages already done."""
    if verbose:
        import os

        os.environ["MEDPIPE_VERBOSE"] = "1"
    try:
        recipe, overrides = _split(args)
        from medpipe.sweep import expand

        sweeps = expand(overrides) if multirun else [overrides]
        console = _console()
        for i, one in enumerate(sweeps):
            if multirun:
                console.rule(f"[bold]sweep {i + 1}/{len(sweeps)}: {' '.join(one)}")
            _run_one(recipe, one, console, force, from_stage, only)
    except _user_errors() as e:
        _fail(e)


def _run_one(recipe, overrides, console, force, from_stage, only) -> None:
    from medpipe.compose import bind_stages, compose
    from medpipe.run import Pipeline

    from .report import print_summary

    cfg, _ = compose(recipe, overrides)
    run_dir = Pipeline(cfg, bind_stages(cfg), recipe, console, overrides).run(force=force, from_stage=from_stage,
                                                                              only=only)
    print_summary(run_dir, console)  # the before → after table: what each stage changed


@app.command("list")
def list_(
    params: Annotated[bool, typer.Option("--params", help="every parameter of each kind (or of KIND) with its default and help")] = False,
    kind: Annotated[Optional[str], typer.Argument(help="with --params: one stage kind")] = None,
) -> None:
    """Recipes, stage kinds with their parameters, models, datasets, launchers."""
    import dataclasses

    from medpipe import registry
    from medpipe.compose import bundled_recipes, group_options

    from .listing import choices_text

    if params:
        from medpipe.errors import ConfigError

        from .listing import params_lines

        try:
            chosen = [kind] if kind else registry.kinds()
            print("\n\n".join("\n".join(params_lines(k, registry.load(k).Params)) for k in chosen))
        except ConfigError as e:
            _fail(e)
        return
    out = [f"recipes:   {', '.join(bundled_recipes())}"]
    for group in ("model", "data", "launcher", "deepspeed"):
        out.append(f"{group + ':':<10} {', '.join(group_options(group))}")
    out.append("stage kinds:")
    for kind in registry.kinds():
        cls = registry.load(kind)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        out.append(f"  {kind}: {doc}")
        fields = [" ".join(filter(None, (f"{f.name}={_default(f)}", choices_text(f)))) for f in dataclasses.fields(cls.Params)]
        out.append("    " + ", ".join(fields))
    print("\n".join(out))


def _default(f) -> str:
    import dataclasses

    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return "???"


@app.command()
def show(args: Overrides = None) -> None:
    """The fully resolved config, and each stage's input, output and whether it will be reused."""
    from omegaconf import OmegaConf

    try:
        from .submit import slurm_overrides, wants_slurm

        if wants_slurm(list(args or [])):  # slurm.KEY=VALUE as on `medpipe submit`
            args = slurm_overrides(list(args or []))
        loaded = _load(args)
        print(OmegaConf.to_yaml(loaded.cfg, resolve=True), end="")
        print("# groups: " + ", ".join(f"{k}={v}" for k, v in sorted(loaded.choices.items()) if v is not None))
        from .show import describe

        for line in describe(loaded.cfg, loaded.plans, loaded.recipe, loaded.overrides):
            print(line)
    except _user_errors() as e:
        _fail(e)


@app.command()
def submit(
    args: Overrides = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="write RUN_DIR/slurm.sbatch, do not submit it")] = False,
) -> None:
    """Run the whole pipeline as one Slurm job: slurm.partition=... slurm.nodes=2 slurm.gpus_per_node=8 slurm.time=..."""
    try:
        from .submit import main_print, submit_run

        recipe, overrides = _split(args)
        main_print(*submit_run(recipe, overrides, _console(), dry_run=dry_run))
    except _user_errors() as e:
        _fail(e)


@app.command()
def validate(args: Overrides = None) -> None:
    """Check config, model path and every record of every stage's data; no training."""
    try:
        from medpipe.errors import ConfigError
        from medpipe.plan import build_plan, check_plan, global_data

        from .datacheck import missing_data

        loaded = _load(args)
        console = _console()
        # the run plan without stage keys: they fingerprint every data file, and missing files are
        # listed all at once first
        plan = build_plan(loaded.cfg, loaded.plans, build_base=True, identify=False)
        console.print(f"model: {plan.base.model_path}")
        for line in plan.memory_lines():  # `check_plan` refuses what does not fit
            console.print(line.lstrip("# "), soft_wrap=True, markup=False)
        missing = missing_data(loaded.plans, global_data(loaded.cfg))  # all of them at once, each with where its set is published
        for line in missing:
            print(f"missing: {line}", file=sys.stderr)
        if missing:
            raise ConfigError(f"{len(missing)} data file(s) missing (listed above); nothing was read")
        check_plan(plan, console)
        console.print(f"[green]✓ {loaded.recipe}: config, model and data are valid ({len(loaded.plans)} stages)")
    except _user_errors() as e:
        _fail(e)


@app.command()
def dedup(
    data: Annotated[str, typer.Argument(help="a data spec: file, directory, glob or conf/data name")],
    want: Annotated[str, typer.Option(help="text | chat | preference | mcq")] = "text",
    engine: Annotated[str, typer.Option(help="single (this process) | datatrove (same keep list)")] = "datatrove",
    executor: Annotated[str, typer.Option(help="datatrove executor: local | slurm | ray")] = "local",
    tasks: Annotated[int, typer.Option(help="datatrove tasks of the signature stage")] = 2,
    work: Annotated[str, typer.Option(help="datatrove working folder (shared storage on a cluster)")] = "dedup_work",
    keep: Annotated[Optional[str], typer.Option(help="write the kept records' file:line here")] = None,
    threshold: Annotated[float, typer.Option(help="near-duplicate Jaccard (MinHash estimate)")] = 0.8,
    partition: Annotated[Optional[str], typer.Option(help="slurm partition")] = None,
    venv: Annotated[Optional[str], typer.Option(help="slurm: venv_path on the nodes")] = None,
    submit: Annotated[bool, typer.Option("--submit", help="slurm/ray: run it (else print the code)")] = False,
) -> None:
    """Exact + MinHash near-dedup of a data spec; datatrove runs it on local tasks, Slurm or Ray."""
    from .dedup import run_dedup

    kw = {k: v for k, v in {"partition": partition, "venv_path": venv}.items() if v}
    try:
        run_dedup(data, want, engine, executor, tasks, work, keep, threshold, submit, kw, print)
    except _user_errors() as e:
        _fail(e)


@app.command()
def status(run_dir: Annotated[str, typer.Argument(help="a run directory (runs/<recipe>-<time>)")]) -> None:
    """Each stage of a run: done / running / interrupted / failed / pending, time, artifact."""
    from pathlib import Path

    from rich.table import Table

    from medpipe.store import stage_table

    try:
        rows = stage_table(Path(run_dir))
    except _user_errors() as e:
        _fail(e)
    table = Table("stage", "kind", "state", "time")
    table.add_column("artifact", overflow="fold")
    for row in rows:
        elapsed = f"{row['elapsed']:.0f}s" if row.get("elapsed") else ""
        if row.get("attempts", 0) > 1:
            elapsed += f" ({row['attempts']} attempts)"
        state = row["state"] + (f" ({row['error']})" if row.get("error") and row["state"] in ("failed", "broken") else "")
        table.add_row(row["stage"], row["kind"], state, elapsed, row["artifact"])
    _console().print(table)
    from .submit import job_lines  # a run submitted with `medpipe submit`: its Slurm job(s)

    for line in job_lines(Path(run_dir)):
        print(line)


@app.command()
def verify(run_dir: Annotated[str, typer.Argument(help="a run directory (runs/<recipe>-<time>)")]) -> None:
    """Check every done stage's files against the sizes and sha256 its artifact.json recorded."""
    try:
        from .rundir import verify_run

        lines, ok = verify_run(run_dir)
    except _user_errors() as e:
        _fail(e)
    print("\n".join(lines))
    if not ok:
        raise typer.Exit(1)


RunDir = Annotated[str, typer.Argument(help="a run directory (runs/<recipe>-<time>)")]
StageOpt = Annotated[Optional[str], typer.Option("--stage", help="stage whose model to use (default: the last done stage)")]


@app.command("eval")
def eval_(
    run_dir: RunDir,
    args: Annotated[Optional[list[str]], typer.Argument(help="eval params as key=value: data=cmexam method=cue shots=5 ...")] = None,
    stage: StageOpt = None,
) -> None:
    """Evaluate a done stage's model; results go to RUN_DIR/eval/<stage>.json (and the report)."""
    try:
        from medpipe.commands.evaluate import evaluate_run_stage

        evaluate_run_stage(run_dir, stage, list(args or []))
    except _user_errors() as e:
        _fail(e)


@app.command()
def report(run_dir: RunDir) -> None:
    """Write RUN_DIR/report.md and report.html: stages, metrics per stage, curves, config."""
    try:
        from .report import build

        md, page = build(run_dir)
        print(f"report: {md}\n        {page}")
    except _user_errors() as e:
        _fail(e)


@app.command()
def serve(
    run_dir: RunDir,
    stage: StageOpt = None,
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
    rag: Annotated[bool, typer.Option("--rag", help="prepend top-k passages of the run's knowledge index")] = False,
    rag_corpus: Annotated[Optional[str], typer.Option(help="corpus for --rag (default: the run's cpt data)")] = None,
    stop_after: Annotated[Optional[float], typer.Option(help="stop by itself after this many seconds")] = None,
    engine: Annotated[str, typer.Option(help="transformers (continuous batching, CPU or GPU) or vllm (vLLM's own server)")] = "transformers",
    api_key: Annotated[Optional[str], typer.Option(help="require Authorization: Bearer KEY (default: $MEDPIPE_API_KEY)")] = None,
    timeout: Annotated[float, typer.Option(help="seconds a request may take, queue wait included (then 503)")] = 120.0,
    truncate: Annotated[str, typer.Option(help="a prompt longer than the context: none (400) or left (drop its oldest tokens)")] = "none",
    max_body_bytes: Annotated[int, typer.Option(help="largest request body (413 above)")] = 2 << 20,
    max_batch: Annotated[int, typer.Option(help="requests generated together in one batch")] = 32,
    batching: Annotated[str, typer.Option(help="continuous (requests join the running batch) or static (micro-batches)")] = "continuous",
) -> None:
    """OpenAI-compatible server (/v1/chat/completions, /v1/models) for a stage's model."""
    try:
        from .serve import Limits, serve as run_server

        limits = Limits(max_body_bytes=max_body_bytes, timeout=timeout, truncate=truncate, max_batch=max_batch,
                        api_key=api_key, batching=batching)
        code = run_server(run_dir, stage, host, port, rag, rag_corpus, stop_after, engine=engine, limits=limits,
                          exit_on_signal=True)
        if code:
            raise typer.Exit(code)
    except _user_errors() as e:
        _fail(e)


@app.command()
def chat(
    run_dir: Annotated[Optional[str], typer.Argument(help="a run directory (not needed with --url)")] = None,
    stage: StageOpt = None,
    message: Annotated[Optional[str], typer.Option("--message", "-m", help="one-shot: answer this and exit")] = None,
    rag: Annotated[bool, typer.Option("--rag", help="prepend top-k passages of the run's knowledge index")] = False,
    rag_corpus: Annotated[Optional[str], typer.Option(help="corpus for --rag (default: the run's cpt data)")] = None,
    url: Annotated[Optional[str], typer.Option(help="talk to an OpenAI-compatible endpoint instead")] = None,
    system: Annotated[Optional[str], typer.Option(help="system prompt")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="tokens per answer")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    seed: Annotated[Optional[int], typer.Option(help="sampling seed (temperature > 0), for repeatable answers")] = None,
) -> None:
    """Talk to a stage's model, interactively or one-shot (-m)."""
    try:
        from medpipe.commands.chat import chat_loop

        if run_dir is None and url is None:
            raise typer.BadParameter("give RUN_DIR or --url")
        import sys

        chat_loop(run_dir, stage, message, rag, rag_corpus, url, system, max_new_tokens, temperature,
                  stream_to=sys.stdout if sys.stdout.isatty() else None, seed=seed)  # stream to a terminal
    except _user_errors() as e:
        _fail(e)


@app.command()
def compare(
    run_dir: RunDir,
    a: Annotated[str, typer.Option("--a", help="stage (or OTHER_RUN_DIR:stage) whose answers are judged")],
    b: Annotated[str, typer.Option("--b", help="stage (or OTHER_RUN_DIR:stage) it is compared with")],
    judge_url: Annotated[str, typer.Option(help="OpenAI-compatible judge endpoint")],
    args: Annotated[Optional[list[str]], typer.Argument(help="data=... (chat questions), limit=N, batch_size=N")] = None,
    judge_model: Annotated[Optional[str], typer.Option(help="model name at the judge endpoint")] = None,
    api_key_env: Annotated[Optional[str], typer.Option(help="env var holding the judge API key")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="tokens per answer")] = 128,
) -> None:
    """Pairwise judging (Win/Tie/Lose, both orders) of two stages' answers to the same questions."""
    try:
        from medpipe.commands.evaluate import compare_run_stages

        compare_run_stages(run_dir, a, b, judge_url, list(args or []), judge_model, api_key_env,
                           max_new_tokens=max_new_tokens)
    except _user_errors() as e:
        _fail(e)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
