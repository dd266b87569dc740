"""A run killed mid-stage resumes from its checkpoint; broken input fails before training, naming
file, line and field."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO, medpipe, read_artifact

CPT_ONLY = """
defaults: [base, model: tiny, data: sample, stage/cpt@stages.cpt, stage/sft@stages.sft, _self_]
name: resumable
stages:
  cpt: {data: "${data.pretrain}", block_size: 64, lr: 3e-3, batch_size: 4, max_steps: 40, save_steps: 3, logging_steps: 2}
  sft: {data: "${data.dialogue}", lr: 5e-3, max_steps: 4, peft: {r: 4, alpha: 8}}
"""


@pytest.mark.slow
def test_killed_stage_resumes_from_its_last_checkpoint(tmp_path):
    recipe = tmp_path / "resumable.yaml"
    recipe.write_text(CPT_ONLY)
    args = [sys.executable, "-m", "medpipe.commands.cli", "run", f"recipe={recipe}", f"run.root={tmp_path}/runs",
            f"run.dir={tmp_path}/runs/r"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpt = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in (tmp_path / "runs" / ".store").glob("cpt-*/checkpoints/checkpoint-*")
                if (p / "trainer_state.json").exists()]
        if done:
            ckpt = done[0]
            break
        time.sleep(0.2)
    assert ckpt is not None, "no checkpoint appeared"
    os.killpg(proc.pid, signal.SIGKILL)  # no cleanup at all: the harshest interruption
    proc.wait()
    stage_dir = ckpt.parent.parent
    assert not (stage_dir / "artifact.json").exists()

    status = medpipe("status", str(tmp_path / "runs" / "r"))
    assert "interrupted" in status.out

    rerun = medpipe("run", f"recipe={recipe}", f"run.root={tmp_path}/runs", f"run.dir={tmp_path}/runs/r")
    assert rerun.code == 0, rerun.out
    assert "resuming from checkpoint-" in rerun.out
    art = read_artifact(stage_dir)
    assert art["metrics"]["resumed_from"].startswith("checkpoint-")
    assert art["metrics"]["steps"] == 40
    # the second stage ran normally on the resumed stage's output
    assert (tmp_path / "runs" / "r" / "02-sft" / "artifact.json").exists()


def _recipe(tmp_path: Path, stage: str) -> Path:
    kind = stage.split(":")[0]
    r = tmp_path / "bad.yaml"
    r.write_text(textwrap.dedent(f"""
        defaults: [base, model: tiny, data: sample, stage/{kind}@stages.{kind}, _self_]
        name: bad
        stages:
        {textwrap.indent(stage, '  ')}
    """))
    return r


@pytest.mark.parametrize("content, needle", [
    ('{"text": "ok"}\n{"text": "ok too"}\n{"text": broken\n', "bad.jsonl:3"),
    ('{"text": "ok"}\n{"body": "no text field"}\n', "bad.jsonl:2"),
    ('{"text": "ok"}\n{"text": ""}\n', "bad.jsonl:2: field 'text'"),
    ("", "bad.jsonl"),
])
def test_broken_pretraining_data_fails_before_training(tmp_path, content, needle):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    recipe = _recipe(tmp_path, f"cpt: {{data: {data}}}")
    r = medpipe("run", f"recipe={recipe}", f"run.root={tmp_path}/runs")
    assert r.code == 2, r.out
    assert needle in r.out
    assert not list((tmp_path / "runs").glob(".store/*/artifact.json"))  # nothing trained


def test_broken_sft_record_names_the_field(tmp_path):
    data = tmp_path / "chat.json"
    data.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
                                {"conversations": [{"from": "human"}]}]))
    recipe = _recipe(tmp_path, f"sft: {{data: {{path: {data}, format: sharegpt}}}}")
    r = medpipe("validate", f"recipe={recipe}")
    assert r.code == 2 and "chat.json:[1]" in r.out and "conversations" in r.out


def test_missing_model_path_and_template_less_tokenizer(tmp_path):
    recipe = _recipe(tmp_path, "sft: {data: '${data.dialogue}'}")
    r = medpipe("validate", f"recipe={recipe}", "model=qwen1.5-7b", f"model.path={tmp_path}/nowhere")
    assert r.code == 2 and f"model.path '{tmp_path}/nowhere' does not exist" in r.out

    from transformers import AutoTokenizer

    from medpipe.stages.models.tiny import ensure_tiny

    model_dir = tmp_path / "no_template"
    import shutil

    shutil.copytree(ensure_tiny(), model_dir)
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    assert not AutoTokenizer.from_pretrained(model_dir).chat_template
    r = medpipe("validate", f"recipe={recipe}", "model=qwen1.5-7b", f"model.path={model_dir}")
    assert r.code == 2 and "has no chat template" in r.out


def test_validate_prints_a_summary_per_source():
    r = medpipe("validate", "recipe=qilin")
    assert r.code == 0, r.out
    assert "pretrain.jsonl" in r.out and "sft_sharegpt.json" in r.out and "preference.jsonl" in r.out


@pytest.mark.slow
def test_dpo_first_in_a_recipe_uses_the_given_model_and_drops_identical_pairs(tmp_path):
    pairs = [json.loads(l) for l in (REPO / "samples" / "preference.jsonl").read_text().splitlines()[:24]]
    pairs[3]["rejected"] = pairs[3]["chosen"]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(p, ensure_ascii=False) for p in pairs) + "\n")
    recipe = _recipe(tmp_path, f"dpo: {{data: {data}, max_steps: 2, batch_size: 4, reward_eval_pairs: 4, "
                               f"peft: {{r: 4, alpha: 8}}}}")
    r = medpipe("run", f"recipe={recipe}", f"run.root={tmp_path}/runs", f"run.dir={tmp_path}/runs/d")
    assert r.code == 0, r.out
    assert "DPO is the first stage: the reference policy is the given model" in r.out
    assert "1 pair(s) with chosen == rejected dropped" in r.out
    art = read_artifact(tmp_path / "runs" / "d" / "01-dpo")
    assert art["metrics"]["pairs"] == 23
