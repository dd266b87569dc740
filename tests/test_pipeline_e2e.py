"""The qilin chain end to end on the tiny model: artifacts, handoff, skip/rerun, DPO reference."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import QUICK, medpipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def qilin(tmp_path_factory):
    root = tmp_path_factory.mktemp("qilin") / "runs"
    r = medpipe("run", "recipe=qilin", f"run.root={root}", f"run.dir={root}/main", *QUICK)
    assert r.code == 0, r.out
    return root, root / "main", r.out


def artifacts(run_dir: Path) -> dict:
    return {d.name: json.loads((d / "artifact.json").read_text()) for d in sorted(run_dir.iterdir())
            if (d / "artifact.json").exists()}


def test_every_stage_trains_and_hands_on(qilin):
    from transformers import AutoModelForCausalLM

    _, run_dir, out = qilin
    arts = artifacts(run_dir)
    assert list(arts) == ["01-cpt", "02-sft", "03-dpo", "04-eval"]
    assert arts["04-eval"]["evaluated_stage"] == "dpo" and 0 <= arts["04-eval"]["metrics"]["cmexam/acc"] <= 1
    assert arts["01-cpt"]["format"] == "full"
    assert arts["02-sft"]["format"] == "adapter" and arts["03-dpo"]["format"] == "adapter"
    # sft trained on top of cpt's output, dpo on top of sft's merged output
    assert arts["02-sft"]["base_model_path"] == arts["01-cpt"]["model_path"]
    assert arts["03-dpo"]["base_model_path"].endswith("/merged")
    assert Path(arts["03-dpo"]["base_model_path"]).parent == Path(arts["02-sft"]["model_path"]).parent
    for name, art in arts.items():
        if name == "04-eval":
            continue
        assert art["metrics"]["last_loss"] < art["metrics"]["first_loss"], (name, art["metrics"])
        model = AutoModelForCausalLM.from_pretrained(art["model_path"])  # adapters load through PEFT
        assert model is not None
    assert "Stage 4/4" in out and "Pipeline qilin complete" in out
    assert (run_dir / "config.yaml").is_file() and (run_dir / "run.json").is_file()
    assert list((run_dir / "01-cpt" / "tensorboard").glob("events.out.tfevents.*"))


def test_dpo_reward_accuracy_rose(qilin):
    m = artifacts(qilin[1])["03-dpo"]["metrics"]
    assert m["reward_accuracy"] > m["first_reward_accuracy"] or m["reward_accuracy"] > 0.6, m
    assert m["reward_margin"] > 0


def _completion_logps(model, probe) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, probe["input_ids"][:, 1:, None])[..., 0]
    total = (logp * probe["completion_mask"][:, 1:]).sum(1)
    return total.chunk(2)


def test_dpo_reference_is_the_sft_model_not_the_base(qilin):
    from transformers import AutoModelForCausalLM

    arts = artifacts(qilin[1])
    probe = torch.load(Path(arts["03-dpo"]["model_path"]).parent / "ref_probe.pt")
    sft = AutoModelForCausalLM.from_pretrained(arts["03-dpo"]["base_model_path"])  # merged SFT artifact
    cpt = AutoModelForCausalLM.from_pretrained(arts["01-cpt"]["model_path"])  # the model before SFT
    sft_c, sft_r = _completion_logps(sft, probe)
    cpt_c, _ = _completion_logps(cpt, probe)
    assert torch.allclose(probe["ref_chosen_logps"], sft_c, atol=1e-3)
    assert torch.allclose(probe["ref_rejected_logps"], sft_r, atol=1e-3)
    assert not torch.allclose(probe["ref_chosen_logps"], cpt_c, atol=1e-1)


def test_merged_weights_equal_base_plus_scaled_lora(qilin):
    from safetensors.torch import load_file

    arts = artifacts(qilin[1])
    sft = arts["02-sft"]
    base = load_file(str(Path(sft["base_model_path"]) / "model.safetensors"))
    merged = load_file(str(Path(sft["model_path"]).parent / "merged" / "model.safetensors"))
    adapter = load_file(str(Path(sft["model_path"]) / "adapter_model.safetensors"))
    cfg = json.loads((Path(sft["model_path"]) / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    checked = 0
    for key, a in adapter.items():
        if not key.endswith("lora_A.weight"):
            continue
        b = adapter[key.replace("lora_A", "lora_B")]
        weight = key.replace("base_model.model.", "").replace(".lora_A.weight", ".weight")
        expected = base[weight] + scale * (b @ a)
        assert torch.allclose(merged[weight], expected, atol=1e-5), weight
        assert not torch.allclose(merged[weight], base[weight])  # the adapter did train
        checked += 1
    assert checked >= 7 * 2  # every linear layer of both blocks


def test_rerun_skips_done_stages_and_a_change_reruns_from_there(qilin):
    root, run_dir, _ = qilin
    before = {n: a["created"] for n, a in artifacts(run_dir).items()}
    again = medpipe("run", "recipe=qilin", f"run.root={root}", f"run.dir={run_dir}", *QUICK)
    assert again.code == 0 and again.out.count("✓ reused") == 4, again.out
    assert {n: a["created"] for n, a in artifacts(run_dir).items()} == before

    changed = medpipe("run", "recipe=qilin", f"run.root={root}", *QUICK, "stages.dpo.beta=0.3")
    assert changed.code == 0 and changed.out.count("✓ reused") == 2, changed.out  # cpt, sft reused; dpo, eval rerun
    changed = medpipe("run", "recipe=qilin", f"run.root={root}", *QUICK, "stages.sft.lr=1e-3")
    assert changed.code == 0 and changed.out.count("✓ reused") == 1, changed.out  # only cpt


def test_status_reports_each_stage(qilin):
    r = medpipe("status", str(qilin[1]))
    assert r.code == 0
    assert r.out.count("done") == 4 and "pending" not in r.out and "failed" not in r.out


def test_only_and_force_keep_previous_results(qilin):
    root, run_dir, _ = qilin
    r = medpipe("run", "recipe=qilin", f"run.root={root}", f"run.dir={run_dir}", *QUICK, "--only", "dpo", "--force")
    assert r.code == 0, r.out
    assert "previous result kept at" in r.out and r.out.count("Stage ") == 1
    store = Path(json.loads((run_dir / "run.json").read_text())["stages"][2]["store_dir"]).parent
    assert list(store.glob("dpo-*.replaced-*"))


def test_run_dir_of_another_recipe_is_refused(qilin, tmp_path):
    run_dir = qilin[1]
    other = tmp_path / "other.yaml"
    other.write_text("defaults: [base, model: tiny, data: sample, stage/sft@stages.sft, _self_]\n"
                     "name: other\nstages:\n  sft: {data: '${data.dialogue}'}\n")
    r = medpipe("run", f"recipe={other}", f"run.dir={run_dir}")
    assert r.code == 2 and "holds a run of recipe 'qilin'" in r.out


def test_sweep_trains_shared_stages_once_and_runs_survive_deletion(qilin):
    import shutil

    from transformers import AutoModelForCausalLM

    root, _, _ = qilin
    show = medpipe("show", "recipe=qilin", f"run.root={root}", *QUICK)
    assert show.out.count("reuse finished result") == 4, show.out
    before = set((root / ".store").glob("dpo-*"))
    r = medpipe("run", "recipe=qilin", f"run.root={root}", *QUICK, "stages.dpo.beta=0.05,0.5", "--multirun")
    assert r.code == 0, r.out
    assert "sweep 1/2" in r.out and "sweep 2/2" in r.out
    assert r.out.count("✓ reused") == 4  # cpt and sft, in both runs
    new = set((root / ".store").glob("dpo-*")) - before
    assert len([p for p in new if "replaced" not in p.name]) == 2
    runs = sorted(p for p in root.glob("qilin-*") if (p / "run.json").exists())[-2:]
    shutil.rmtree(runs[0])  # deleting one run never breaks another that shares its stages
    for stage in ("01-cpt", "02-sft", "03-dpo"):
        art = json.loads((runs[1] / stage / "artifact.json").read_text())
        assert AutoModelForCausalLM.from_pretrained(art["model_path"]) is not None
