"""IIMedGPT recipe end to end: 1:1 single/multi-turn mix, held-out best checkpoint, spike guard, DPO."""
from __future__ import annotations

import json

import pytest

from conftest import medpipe

pytestmark = pytest.mark.slow


def test_iimedgpt_runs_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "runs" / "ii"
    r = medpipe("run", "recipe=iimedgpt", f"run.root={tmp_path}/runs", f"run.dir={run_dir}",
                "stages.sft.max_steps=12", "stages.sft.eval_steps=6", "stages.sft.logging_steps=2",
                "stages.dpo.max_steps=8", "stages.dpo.logging_steps=2", "stages.dpo.reward_eval_pairs=16")
    assert r.code == 0, r.out
    sft = json.loads((run_dir / "01-sft" / "artifact.json").read_text())
    dpo = json.loads((run_dir / "02-dpo" / "artifact.json").read_text())
    m = sft["metrics"]
    assert m["heldout"] > 0 and "best_eval_loss" in m  # 10 % held out, evaluated
    assert m["spike_guard_skipped"] == 0  # guard on, nothing to skip on clean data
    assert m["last_loss"] < m["first_loss"]
    # 1:1 single/multi-turn: 200 alpaca + 100 sharegpt → 150 + 150 before the held-out split
    assert 0.4 < m["conversations_multi_turn"] / (m["conversations"]) < 0.6
    assert dpo["metrics"]["reward_margin"] > 0
    for art in (sft, dpo):
        assert AutoModelForCausalLM.from_pretrained(art["model_path"]) is not None
