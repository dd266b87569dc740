"""The AntGLM-Med recipe: the paper's values as composed, and the whole chain end to end on the tiny
model (cpt → sft → voc_label → cpoly → eval) with a few steps per stage."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import medpipe, read_artifact

QUICK = ["stages.cpt.max_steps=6", "stages.cpt.logging_steps=1",
         "stages.sft.max_steps=6", "stages.sft.logging_steps=2",
         "stages.voc.limit=4", "stages.voc.max_new_tokens=4", "stages.voc.final_max_new_tokens=4",
         "stages.cpoly.max_steps=12", "stages.cpoly.logging_steps=2",  # 6 logs: first/last = means of 2
         "stages.cpt.batch_size=4", "stages.sft.batch_size=4", "stages.cpoly.batch_size=8"]


def test_table8_setting_draws_500_per_dataset_at_random():
    """§4.3.2 "We randomly selected 500 samples from the PubMedQA, MedMCQA, and MedQA datasets
    respectively": samples_per_task draws N per task (seeded), never simply the first N."""
    from medpipe.stages.cpoly import sample_per_task

    recs = [{"task": t, "i": i} for t in ("medqa", "pubmedqa") for i in range(1000)] + [{"task": "medmcqa", "i": 0}]
    got = sample_per_task(recs, 500, seed=0)
    assert sum(r["task"] == "medqa" for r in got) == 500 and sum(r["task"] == "pubmedqa" for r in got) == 500
    assert [r for r in got if r["task"] == "medmcqa"] == [{"task": "medmcqa", "i": 0}]  # fewer than N: all kept
    assert got == sample_per_task(recs, 500, seed=0)  # the same draw for the same seed
    assert got != sample_per_task(recs, 500, seed=1)
    assert [r["i"] for r in got if r["task"] == "medqa"] != list(range(500))  # not the first 500
    assert got == sorted(got, key=recs.index)  # the data order is kept


@pytest.mark.slow
def test_antglm_end_to_end(tmp_path):
    import torch

    run_dir = tmp_path / "runs" / "main"
    r = medpipe("run", "recipe=antglm", f"run.root={tmp_path}/runs", f"run.dir={run_dir}", *QUICK)
    assert r.code == 0, r.out
    arts = {d.name: read_artifact(d) for d in sorted(run_dir.iterdir())
            if (d / "artifact.json").exists()}
    assert list(arts) == ["01-base_eval", "02-cpt", "03-eval_cpt", "04-sft", "05-eval_sft", "06-voc", "07-cpoly", "08-eval"]
    for name in ("02-cpt", "04-sft", "07-cpoly"):
        m = arts[name]["metrics"]
        assert m["last_loss"] < m["first_loss"], (name, m)
    # cpt: Adam β2 0.95 and cosine down to 10 % of the peak lr
    targs = torch.load(Path(arts["02-cpt"]["model_path"]) / "training_args.bin", weights_only=False)
    assert (targs.adam_beta2, targs.weight_decay, str(targs.lr_scheduler_type)) == (0.95, 0.1, "SchedulerType.COSINE_WITH_MIN_LR")
    lrs = [json.loads(x)["learning_rate"] for x in (run_dir / "02-cpt" / "log_history.jsonl").read_text().splitlines()
           if "learning_rate" in json.loads(x)]
    peak = max(lrs)
    assert min(lrs[1:]) >= 0.1 * peak * 0.999 and lrs[-1] < 0.5 * peak
    # voc passes the SFT model through and hands its dataset on; cpoly read it
    voc, cp, ev = arts["06-voc"], arts["07-cpoly"], arts["08-eval"]
    assert voc["model_path"] == Path(arts["04-sft"]["model_path"]).as_posix()
    assert voc["metrics"]["items"] == 4 and voc["metrics"]["labeled"] + voc["metrics"]["unparseable"] == 4
    assert cp["metrics"]["input_dataset_records"] == voc["metrics"]["labeled"]
    assert cp["format"] == "full" and cp["model_path"] == cp["task_models"]["pubmedqa"]
    assert cp["handoff"]["cpoly"]["base"] == voc["model_path"]
    # eval: PubMedQA accuracy by option perplexity of the model merged for PubMedQA
    assert ev["evaluated_stage"] == "cpoly" and ev["model_path"] == cp["model_path"]
    assert ev["results"]["pubmedqa"]["invalid"] == 0 and "pubmedqa/acc" in ev["metrics"]  # ppl picks an option for every item
    assert "Pipeline antglm complete" in r.out
