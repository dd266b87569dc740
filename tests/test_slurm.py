"""launcher=slurm on a REAL single-node Slurm (slurm-wlm + munge, ../shared/tools/slurm-single-node.sh):
`medpipe submit` writes and submits the batch job, the driver starts each training stage with srun
(deepspeed --num_gpus 2 inside: 2 CPU ranks, gloo, ZeRO-2), `scancel` mid-stage leaves it
interrupted, and a resubmission resumes it from its checkpoint, skipping the finished stage.
Plus the generated commands and script (no Slurm needed)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, medpipe, medpipe_proc, zero2_stage, read_artifact

SCRIPT = REPO.parent / "shared" / "tools" / "slurm-single-node.sh"

RECIPE = """
defaults: [base, model: tiny, data: sample, stage/cpt@stages.cpt, stage/sft@stages.sft, stage/eval@stages.eval, _self_]
name: slurmq
stages:
  cpt: {data: "${data.pretrain}", block_size: 64, max_steps: 3, logging_steps: 1, batch_size: 2, lr: 3e-3, save_steps: 50}
  sft: {data: "${data.dialogue}", lr: 5e-3, max_steps: 40, logging_steps: 1, batch_size: 2, max_length: 64,
        save_steps: 3, peft: {r: 4, alpha: 8}}
  eval: {data: [{path: "${medpipe:samples}/mcq_cmexam.csv", format: cmexam, limit: 4}], method: cue, max_new_tokens: 4}
"""


def _slurm_up() -> bool:
    return shutil.which("sinfo") is not None and subprocess.run(
        ["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running single-node Slurm: the one already up (e.g. started by .ci/run), else started
    here and stopped at the end."""
    if _slurm_up():
        yield
        return
    if os.geteuid() != 0:
        pytest.skip("real-Slurm test: needs root to start slurm-wlm + munge (slurm-single-node.sh)")
    if not SCRIPT.is_file():
        pytest.skip(f"real-Slurm test: {SCRIPT} is missing (shared/ must sit beside the repo)")
    subprocess.run(["bash", str(SCRIPT), "start"], check=True, timeout=600, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], timeout=120, capture_output=True)


def _job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True)
    m = re.search(r"JobState=(\w+)", out.stdout)
    return m.group(1) if m else "GONE"


def _wait(pred, timeout: float, what: str, log: Path | None = None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(1)
    tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def _submit(tmp_path: Path, recipe: Path, run_dir: Path) -> str:
    r = medpipe_proc("submit", f"recipe={recipe}", f"run.root={tmp_path}/runs", f"run.dir={run_dir}",
                     "slurm.cpus_per_task=2", "slurm.time=20", "launcher.num_gpus=2", "launcher.master_port=29561",
                     cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"submitted slurm job (\d+)", r.stdout)
    assert m, r.stdout
    return m.group(1)


@pytest.mark.slurm
@pytest.mark.slow
def test_submit_scancel_mid_stage_and_resume_on_real_slurm(tmp_path, slurm_cluster):
    recipe = tmp_path / "slurmq.yaml"
    recipe.write_text(RECIPE)
    run_dir = tmp_path / "runs" / "slurmq"
    job = _submit(tmp_path, recipe, run_dir)
    script = (run_dir / "slurm.sbatch").read_text()
    for line in ("#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@300",
                 f"#SBATCH --output={run_dir}/slurm-%j.out", "#SBATCH --cpus-per-task=2", "#SBATCH --time=20"):
        assert line in script.splitlines()
    assert re.search(r"^exec \S+ -m medpipe.commands.cli run recipe=\S+slurmq.yaml launcher=slurm .*run.dir=",
                     script, re.M)
    shown = medpipe("show", f"recipe={recipe}", f"run.dir={run_dir}", "launcher=slurm")
    assert f"# sbatch script ({run_dir}/slurm.sbatch):" in shown.out and "#   #SBATCH --requeue" in shown.out
    log = run_dir / f"slurm-{job}.out"

    # scancel once sft (2 ranks under srun + deepspeed) has written a checkpoint
    sft_ckpts = lambda: sorted((run_dir / "02-sft" / "checkpoints").glob("checkpoint-*/trainer_state.json")) \
        if (run_dir / "02-sft").exists() else []
    _wait(sft_ckpts, 400, "a checkpoint of the sft stage", log)
    st = medpipe_proc("status", str(run_dir))
    assert re.search(rf"slurm job {job}: RUNNING", st.stdout), st.stdout
    subprocess.run(["scancel", job], check=True)
    _wait(lambda: _job_state(job) in ("CANCELLED", "GONE"), 120, "the cancelled job to end", log)
    _wait(lambda: json.loads((run_dir / "02-sft" / "status.json").read_text())["state"] != "running",
          60, "sft to be marked interrupted", log)
    assert json.loads((run_dir / "02-sft" / "status.json").read_text())["state"] == "interrupted"
    st = medpipe_proc("status", str(run_dir))
    assert re.search(rf"slurm job {job}: CANCELLED", st.stdout), st.stdout
    first = log.read_text()
    assert "srun" in first and "--num_gpus 2" in first

    job2 = _submit(tmp_path, recipe, run_dir)
    assert job2 != job
    log2 = run_dir / f"slurm-{job2}.out"
    _wait(lambda: _job_state(job2) in ("COMPLETED", "FAILED", "CANCELLED", "GONE"), 600, "the second job", log2)
    out = log2.read_text()
    assert _job_state(job2) in ("COMPLETED", "GONE"), out[-4000:]
    assert "Pipeline slurmq complete" in out, out[-4000:]
    assert "✓ reused" in out  # cpt finished in the first job
    cpt = zero2_stage(run_dir, "01-cpt")
    sft = zero2_stage(run_dir, "02-sft")
    assert sft["metrics"]["resumed_from"].startswith("checkpoint-")
    assert sft["metrics"]["steps"] == 40 and cpt["metrics"]["steps"] == 3
    assert read_artifact(run_dir / "03-eval")["evaluated_stage"] == "sft"
    st = medpipe_proc("status", str(run_dir))
    assert re.search(rf"slurm job {job2}: COMPLETED", st.stdout), st.stdout


SFT_ONLY = """
defaults: [base, model: tiny, data: sample, stage/sft@stages.sft, _self_]
name: requeued
stages:
  sft: {data: "${data.dialogue}", lr: 5e-3, max_steps: 30, logging_steps: 1, batch_size: 2, max_length: 64,
        save_steps: 3, peft: {r: 4, alpha: 8}}
"""


@pytest.mark.slurm
@pytest.mark.slow
def test_a_requeued_job_resumes_the_stage_in_the_same_job(tmp_path, slurm_cluster):
    """Preemption/requeue (`scontrol requeue`): the same job id starts again (after Slurm's ~120 s
    hold-off) with SLURM_RESTART_COUNT=1, its output appended to the same file, and the stage
    resumes from its checkpoint."""
    recipe = tmp_path / "requeued.yaml"
    recipe.write_text(SFT_ONLY)
    run_dir = tmp_path / "runs" / "requeued"
    job = _submit(tmp_path, recipe, run_dir)
    log = run_dir / f"slurm-{job}.out"
    _wait(lambda: sorted((run_dir / "01-sft" / "checkpoints").glob("checkpoint-*/trainer_state.json"))
          if (run_dir / "01-sft").exists() else [], 400, "a checkpoint of the sft stage", log)
    subprocess.run(["scontrol", "requeue", job], check=True)
    _wait(lambda: log.exists() and "restart=1" in log.read_text(), 400, "the requeued job to start again", log)
    _wait(lambda: _job_state(job) in ("COMPLETED", "FAILED", "CANCELLED", "GONE"), 600, "the requeued job", log)
    out = log.read_text()
    assert _job_state(job) in ("COMPLETED", "GONE"), out[-4000:]
    assert "restart=0" in out and "DUE TO JOB REQUEUE" in out and "stage sft interrupted" in out
    assert out.index("restart=0") < out.index("DUE TO JOB REQUEUE") < out.index("restart=1")
    assert "Pipeline requeued complete" in out
    sft = zero2_stage(run_dir, "01-sft")
    assert sft["metrics"]["resumed_from"].startswith("checkpoint-") and sft["metrics"]["steps"] == 30
    st = medpipe_proc("status", str(run_dir))
    assert re.search(rf"slurm job {job}: COMPLETED, restarts 1", st.stdout), st.stdout


def test_srun_commands_for_one_and_two_nodes(monkeypatch):
    from medpipe.compose import compose
    from medpipe.launch import command, planned_world_size
    from omegaconf import OmegaConf

    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(k)
    cfg, _ = compose("qilin", ["launcher=slurm", "launcher.sbatch.nodes=2", "launcher.sbatch.gpus_per_node=8"])
    lau = OmegaConf.to_container(cfg.launcher, resolve=True)
    assert planned_world_size(lau) == 16
    two = command(lau, Path("/s/stage.json"))
    assert two[1:6] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--overlap"]
    assert two[6:8] == ["bash", "-c"]
    assert "--hostfile /s/hostfile --no_ssh --node_rank=$SLURM_NODEID" in two[8]
    assert two[8].endswith("--master_port 29500 --module medpipe.entry /s/stage.json")
    # inside an allocation: nodes and GPUs from Slurm's variables, master = first host
    monkeypatch.setenv("SLURM_NNODES", "1")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "4")
    lau["sbatch"]["nodes"] = 1
    one = command(lau, Path("/s/stage.json"))
    assert planned_world_size(lau) == 4
    assert one[6:8] == ["bash", "-c"]  # the task's shell picks its GPUs (tests/test_gpu_launch.py runs it)
    assert one[8].endswith("cut -d, -f1-4) || echo --num_gpus 4) --master_port 29500 --module medpipe.entry /s/stage.json")


def test_the_driver_requeues_on_the_time_limit_warning_and_stops_on_sigterm(tmp_path):
    """As the batch shell (exec'd), the driver gets `--signal=B:USR1@...`: it requeues its own job
    (a stand-in scontrol records the call); SIGTERM (scancel, preemption) becomes the Ctrl-C path."""
    import sys

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/scontrol.args\n")
    (fake / "scontrol").chmod(0o755)
    code = ("import os, signal, time\n"
            "from medpipe.slurm import install_driver_signals\n"
            "install_driver_signals()\n"
            "os.kill(os.getpid(), signal.SIGUSR1)\n"
            "try:\n"
            "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\n"
            "except KeyboardInterrupt as e:\n"
            "    print('interrupted by', e)\n")
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", SLURM_JOB_ID="4242")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "medpipe: time limit near: requeueing job 4242" in r.stdout
    assert "interrupted by signal SIGTERM" in r.stdout
    assert (tmp_path / "scontrol.args").read_text() == "requeue 4242\n"


def test_submit_refuses_unknown_slurm_keys_before_anything(tmp_path):
    r = medpipe("submit", "recipe=qilin", "slurm.partiton=gpu", f"run.root={tmp_path}")
    assert r.code == 2
    assert "slurm.partiton: unknown key (did you mean 'slurm.partition'?)" in r.out
    assert not (tmp_path).joinpath("qilin").exists()


def test_dry_run_writes_the_script_into_the_run_dir(tmp_path):
    run_dir = tmp_path / "r"
    r = medpipe("submit", "--dry-run", "recipe=qilin", f"run.root={tmp_path}", f"run.dir={run_dir}",
                "slurm.partition=gpu", "slurm.nodes=2", "slurm.gpus_per_node=8", "slurm.time=2-00:00:00",
                "stages.cpt.batch_size=16", "stages.sft.batch_size=512", "stages.dpo.batch_size=32")
    assert r.code == 0, r.out
    lines = (run_dir / "slurm.sbatch").read_text().splitlines()
    for want in ("#SBATCH --partition=gpu", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --time=2-00:00:00", "#SBATCH --requeue",
                 "#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@300"):
        assert want in lines
    assert lines[-1].startswith("exec ") and lines[-1].endswith(f"run.dir={run_dir}")
    assert " launcher=slurm " in lines[-1] and " launcher.sbatch.partition=gpu " in lines[-1]
    run_file = json.loads((run_dir / "run.json").read_text())
    assert run_file["name"] == "qilin"
    # the run plan in the script: each training stage's store entry (the one run.json names), its
    # batch on 2 × 8 ranks and the srun step that starts it
    for s in (s for s in run_file["stages"] if s["kind"] in ("cpt", "sft", "dpo")):
        at = next(i for i, line in enumerate(lines) if line.startswith(f"#  {s['link']} [{s['kind']}] input: "))
        assert lines[at].endswith(f"; train → {s['store_dir']}"), lines[at]
        assert lines[at + 1].startswith("#     batch: global batch ") and lines[at + 1].endswith(" × 16 rank(s)")
        assert lines[at + 2].startswith("#     launch: ") and " --nodes=2 --ntasks=2 " in lines[at + 2]
        assert lines[at + 2].endswith(f" --module medpipe.entry {s['store_dir']}/stage.json'"), lines[at + 2]


def test_status_and_submit_without_a_slurm_client_say_so(tmp_path, monkeypatch):
    from medpipe import slurm
    from medpipe.errors import MedpipeError

    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch / scontrol here
    (tmp_path / slurm.JOBS_FILE).write_text(json.dumps({"jobs": [{"job_id": "7"}]}))
    assert slurm.job_state("7") == {"job_id": "7", "state": "UNKNOWN", "reason": "scontrol: not found (a Slurm client "
                                    "must be on PATH: run this on a login or compute node of the cluster)"}
    (tmp_path / "x.sbatch").write_text("#!/bin/bash\n")
    with pytest.raises(MedpipeError, match=r"^sbatch: not found \(a Slurm client must be on PATH"):
        slurm.submit(tmp_path / "x.sbatch")
