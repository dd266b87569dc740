"""The run plan (medpipe.plan) is built once and executed as built: a run reads each finished
artifact once, computes each key once (a stage is re-keyed only when its upstream handed on other
content than the plan saw), links each stage once and writes run.json once per key change;
`show` prints the same plan from the same single build."""
from __future__ import annotations

import io
import os
import textwrap
from collections import Counter
from pathlib import Path

import pytest

PLUGINS = Path(__file__).parent / "plugins"


@pytest.fixture
def kinds(monkeypatch, tmp_path):
    """tests/plugins/store_stages.py's `weights` (writes a model) and `consume` (reads it) kinds."""
    from medpipe import registry

    monkeypatch.syspath_prepend(str(PLUGINS))
    import store_stages

    names = {"weights": store_stages.WeightsStage, "consume": store_stages.ConsumeStage}
    for name, cls in names.items():
        registry.register(name, cls)
    monkeypatch.setenv("MEDPIPE_TEST_COUNT", str(tmp_path / "count"))
    monkeypatch.setenv("MEDPIPE_TEST_WEIGHTS", "a")
    yield
    for name in names:
        registry.unregister(name)


@pytest.fixture
def counted(monkeypatch):
    """Counts of Artifact.load, stage-key hashes, run-dir links and run.json writes."""
    from medpipe import artifact, plan, run

    counts: Counter = Counter()
    load = artifact.Artifact.load.__func__

    def counting_load(cls, directory):
        counts["load"] += 1
        return load(cls, directory)

    def counting_hash(obj):
        counts["inputs_hash" if "input" in obj else "config_hash"] += 1
        return artifact.stable_hash(obj)

    def counting_link(run_dir, name, target):
        counts["link"] += 1
        return link(run_dir, name, target)

    def counting_write(path, data):
        counts["run.json" if Path(path).name == "run.json" else "other json"] += 1
        return write(path, data)

    link, write = run.link, run.write_json_atomic
    monkeypatch.setattr(artifact.Artifact, "load", classmethod(counting_load))
    monkeypatch.setattr(plan, "stable_hash", counting_hash)
    monkeypatch.setattr(run, "link", counting_link)
    monkeypatch.setattr(run, "write_json_atomic", counting_write)
    return counts


def pipeline(tmp_path: Path):
    from rich.console import Console

    from medpipe.compose import bind_stages, compose
    from medpipe.run import Pipeline

    r = tmp_path / "chain.yaml"
    r.write_text(textwrap.dedent("""
        defaults: [base, model: tiny, _self_]
        name: chain
        stages:
          w: {kind: weights}
          c: {kind: consume}
    """))
    cfg, _ = compose(str(r), [f"run.root={tmp_path}/runs", f"run.dir={tmp_path}/runs/r"])
    out = io.StringIO()
    return Pipeline(cfg, bind_stages(cfg), str(r), Console(file=out, width=400)), out


def test_a_fresh_run_loads_keys_links_and_records_each_stage_once(kinds, counted, tmp_path):
    pipe, out = pipeline(tmp_path)
    run_dir = pipe.run()
    # w: trained, its artifact read once after training; c: re-keyed once, when w's content was
    # known (the plan could only name w's key), then trained and read once
    assert dict(counted) == {"config_hash": 2, "inputs_hash": 3, "load": 2, "link": 2, "run.json": 2,
                             "other json": 2}  # + each stage's stage.json
    assert os.readlink(run_dir / "02-c") == os.path.relpath(
        next((tmp_path / "runs" / ".store").glob("consume-*")), run_dir)


def test_a_rerun_reads_each_finished_artifact_once_and_rewrites_nothing(kinds, counted, tmp_path):
    pipe, _ = pipeline(tmp_path)
    pipe.run()
    counted.clear()
    pipe, out = pipeline(tmp_path)
    pipe.run()
    assert out.getvalue().count("✓ reused") == 2
    assert dict(counted) == {"config_hash": 2, "inputs_hash": 2, "load": 2, "link": 2, "run.json": 1}


def test_show_prints_the_plan_from_one_read_of_each_finished_stage(kinds, counted, tmp_path):
    from medpipe.commands.show import describe

    pipe, _ = pipeline(tmp_path)
    pipe.run()
    counted.clear()
    lines = describe(pipe.cfg, pipe.plans)
    store = tmp_path / "runs" / ".store"
    assert [line for line in lines if line.startswith("#  0")] == [
        f"#  01-w [weights] input: model tiny model (built locally, cached); reuse finished result "
        f"{next(store.glob('weights-*'))}",
        f"#  02-c [consume] input: stage 'w'; reuse finished result {next(store.glob('consume-*'))}"]
    assert dict(counted) == {"config_hash": 2, "inputs_hash": 2, "load": 2}


def test_an_entry_another_run_finished_after_the_plan_is_reused_not_retrained(kinds, tmp_path, monkeypatch):
    """Two runs sharing a store: the one that planned first finds the other's results when it gets to
    them, and reuses them (never moves them aside to train the same stage again)."""
    from medpipe import run

    first, out = pipeline(tmp_path)
    checked = run.check_plan

    def the_other_run_finishes_first(plan, console):
        checked(plan, console)
        monkeypatch.setattr(run, "check_plan", checked)
        other, _ = pipeline(tmp_path)
        other.cfg.run.dir = str(tmp_path / "runs" / "other")
        other.run()

    monkeypatch.setattr(run, "check_plan", the_other_run_finishes_first)
    first.run()
    assert out.getvalue().count("✓ reused") == 2, out.getvalue()
    assert (tmp_path / "count").read_text() == "1"  # consume ran once, in the other run
    assert not list((tmp_path / "runs" / ".store").glob("*.replaced-*"))


def test_launchers_are_one_table_that_every_conf_launcher_is_in(monkeypatch, tmp_path):
    from medpipe import launch
    from medpipe.compose import group_options
    from medpipe.errors import MedpipeError

    assert set(group_options("launcher")) <= set(launch.LAUNCHERS)
    with pytest.raises(MedpipeError, match=r"^unknown launcher 'mpirun' \(available: local, deepspeed, torchrun, "
                                           r"accelerate, slurm\)$"):
        launch.command({"name": "mpirun"}, tmp_path / "stage.json")
    monkeypatch.setitem(launch.LAUNCHERS, "mpirun", lambda lau, f: ["mpirun", "-n", str(lau["num_gpus"]), str(f)])
    assert launch.command({"name": "mpirun", "num_gpus": 2}, tmp_path / "stage.json") == \
        ["mpirun", "-n", "2", str(tmp_path / "stage.json")]
    assert launch.command({"name": "local"}, tmp_path / "stage.json") is None


def test_show_names_the_recipe_model_by_its_source():
    """`show` said "tiny model" for every model without a path (model=smollm2-135m included)."""
    from medpipe.plan import model_label

    assert model_label({"name": "tiny", "source": "tiny"}) == "tiny model (built locally, cached)"
    assert model_label({"name": "smollm2-135m", "source": "smollm2"}) == \
        "smollm2-135m (from source 'smollm2', converted once into the cache)"
    assert model_label({"name": "qwen1.5-7b", "source": "hub"}) == "qwen1.5-7b (from the hub)"
