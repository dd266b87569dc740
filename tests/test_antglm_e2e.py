"""The AntGLM-Med recipe: the paper's values as composed, and the whole chain end to end on the tiny
model (cpt → sft → voc_label → cpoly → eval) with a few steps per stage."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import medpipe

QUICK = ["stages.cpt.max_steps=6", "stages.cpt.logging_steps=1",
         "stages.sft.max_steps=6", "stages.sft.logging_steps=2",
         "stages.voc.limit=4", "stages.voc.max_new_tokens=4", "stages.voc.final_max_new_tokens=4",
         "stages.cpoly.max_steps=8", "stages.cpoly.logging_steps=2",
         "stages.cpt.batch_size=4", "stages.sft.batch_size=4", "stages.cpoly.batch_size=4"]


def test_recipe_carries_the_paper_values():
    from omegaconf import OmegaConf

    from medpipe.compose import compose

    cfg, _ = compose("antglm", ["model=qwen1.5-7b"])  # no tiny profile: the recipe's own values
    s = OmegaConf.to_container(cfg.stages, resolve=True)
    assert list(s) == ["cpt", "sft", "voc", "cpoly", "eval"]
    cpt = s["cpt"]
    assert (cpt["lr"], cpt["scheduler"], cpt["scheduler_kwargs"]) == (7e-6, "cosine_with_min_lr", {"min_lr_rate": 0.1})
    assert (cpt["adam_beta1"], cpt["adam_beta2"], cpt["weight_decay"], cpt["max_grad_norm"]) == (0.9, 0.95, 0.1, 1.0)
    sft = s["sft"]
    assert (sft["lr"], sft["scheduler"], sft["weight_decay"], sft["max_grad_norm"]) == (6e-6, "cosine", 0.1, 1.0)
    cp = s["cpoly"]
    assert (cp["epochs"], cp["lr"], cp["scheduler"], cp["weight_decay"], cp["warmup"], cp["batch_size"]) == \
        (10, 5e-5, "linear", 0.01, 0.06, 12)
    assert (cp["adapter"], cp["n_shared_skills"], cp["n_task_skills"], cp["r"], cp["tau"]) == ("cpoly", 4, 1, 4, 1.0)
    assert [d["format"] for d in cp["data"]] == ["pubmedqa", "medmcqa", "medqa"]
    assert s["eval"]["method"] == "ppl" and s["eval"]["data"]["format"] == "pubmedqa"
    lora, _ = compose("antglm", ["model=qwen1.5-7b", "stages.cpoly.adapter=lora"])
    assert lora.stages.cpoly.adapter == "lora"


@pytest.mark.slow
def test_antglm_end_to_end(tmp_path):
    import torch

    run_dir = tmp_path / "runs" / "main"
    r = medpipe("run", "recipe=antglm", f"run.root={tmp_path}/runs", f"run.dir={run_dir}", *QUICK)
    assert r.code == 0, r.out
    arts = {d.name: json.loads((d / "artifact.json").read_text()) for d in sorted(run_dir.iterdir())
            if (d / "artifact.json").exists()}
    assert list(arts) == ["01-cpt", "02-sft", "03-voc", "04-cpoly", "05-eval"]
    for name in ("01-cpt", "02-sft", "04-cpoly"):
        m = arts[name]["metrics"]
        assert m["last_loss"] < m["first_loss"], (name, m)
    # cpt: Adam β2 0.95 and cosine down to 10 % of the peak lr
    targs = torch.load(Path(arts["01-cpt"]["model_path"]) / "training_args.bin", weights_only=False)
    assert (targs.adam_beta2, targs.weight_decay, str(targs.lr_scheduler_type)) == (0.95, 0.1, "SchedulerType.COSINE_WITH_MIN_LR")
    lrs = [json.loads(x)["learning_rate"] for x in (run_dir / "01-cpt" / "log_history.jsonl").read_text().splitlines()
           if "learning_rate" in json.loads(x)]
    peak = max(lrs)
    assert min(lrs[1:]) >= 0.1 * peak * 0.999 and lrs[-1] < 0.5 * peak
    # voc passes the SFT model through and hands its dataset on; cpoly read it
    voc, cp, ev = arts["03-voc"], arts["04-cpoly"], arts["05-eval"]
    assert voc["model_path"] == Path(arts["02-sft"]["model_path"]).as_posix()
    assert voc["metrics"]["items"] == 4 and voc["metrics"]["labeled"] + voc["metrics"]["unparseable"] == 4
    assert cp["metrics"]["input_dataset_records"] == voc["metrics"]["labeled"]
    assert cp["format"] == "full" and cp["model_path"] == cp["task_models"]["pubmedqa"]
    assert cp["handoff"]["cpoly"]["base"] == voc["model_path"]
    # eval: PubMedQA accuracy by option perplexity of the model merged for PubMedQA
    assert ev["evaluated_stage"] == "cpoly" and ev["model_path"] == cp["model_path"]
    assert 0.0 <= ev["metrics"]["pubmedqa/acc"] <= 1.0
    assert "Pipeline antglm complete" in r.out
