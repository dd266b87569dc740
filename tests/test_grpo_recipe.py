"""recipes/med_rlvr.yaml end to end on the tiny model (sft → exam → grpo → the same exam), and a
grpo stage appended to a paper recipe from the command line."""
from __future__ import annotations

import json

import pytest

from conftest import medpipe, read_artifact


def test_a_grpo_stage_appends_to_any_recipe():
    r = medpipe("show", "recipe=qilin", '+stages.rl={kind: grpo, from: dpo, data: "${data.medqa}", heldout: 0.2}')
    assert r.code == 0, r.out
    assert "[grpo] input: stage 'dpo'" in r.out
    assert "global batch 8 = 8 per device × 1 accumulation × 1 rank(s)" in r.out.split("[grpo]")[1]


@pytest.mark.slow
def test_med_rlvr_recipe_end_to_end(tmp_path):
    run_dir = tmp_path / "runs" / "m"
    r = medpipe("run", "recipe=med_rlvr", f"run.root={tmp_path}/runs", f"run.dir={run_dir}")
    assert r.code == 0, r.out
    arts = {p.parent.name: read_artifact(p.parent) for p in run_dir.glob("*/artifact.json")}
    assert sorted(arts) == ["01-exam_base", "02-sft", "03-exam_before", "04-grpo", "05-exam_after"]
    base, sft, before, grpo, after = (arts[k] for k in sorted(arts))
    assert grpo["base_model_path"] == sft["merged_path"]          # RL continued on the SFT model
    assert before["evaluated_stage"] == "sft" and after["evaluated_stage"] == "grpo"
    # the same exam, the same protocol: identical prompts before and after RL
    for name in ("medqa", "medmcqa"):
        shas = [[json.loads(l)["prompt_sha"] for l in (run_dir / s / "details" / f"{name}.jsonl").read_text().splitlines()]
                for s in ("01-exam_base", "03-exam_before", "05-exam_after")]
        assert shas[0] == shas[1] == shas[2] and len(shas[0]) == 8
    m = grpo["metrics"]
    assert m["prompts"] == 114 and m["heldout"] == 6
    # the malformed answers of a random model get Med-RLVR's −1 before and after
    assert m["heldout_before/reward"] == -1.0 and m["heldout_before/format_valid"] == 0.0
    assert "rewards/mcq_exact/mean" in (run_dir / "04-grpo" / "log_history.jsonl").read_text()
