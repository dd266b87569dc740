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


STAGES = ["01-cpt", "02-cmexam_cpt", "03-ceval_cpt", "04-sft", "05-cmexam_sft", "06-ceval_sft", "07-dpo", "08-eval"]
IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 64, 12]])


def logits_of(path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():  # adapter dirs load through PEFT
        return AutoModelForCausalLM.from_pretrained(path).eval()(input_ids=IDS).logits


def assert_trained_on(art: dict, input_path) -> None:
    """The artifact's model loads, and its logits are finite and not those of the model it trained on."""
    got = logits_of(art["model_path"])
    assert torch.isfinite(got).all()
    assert (got - logits_of(input_path)).abs().max() > 1e-3, art["stage"]


def test_every_stage_trains_and_hands_on(qilin):
    from medpipe.stages.models.tiny import ensure_tiny

    _, run_dir, out = qilin
    arts = artifacts(run_dir)
    assert list(arts) == STAGES
    # the paper's tables: CMExam accuracy + explanation BLEU/ROUGE and C-Eval 5-shot after CPT and SFT,
    # Huatuo-26M BLEU/ROUGE (stand-in: the instruction set) after DPO
    for name, evaluated in (("02-cmexam_cpt", "cpt"), ("05-cmexam_sft", "sft")):
        assert arts[name]["evaluated_stage"] == evaluated
        assert {"cmexam/acc", "cmexam/expl_bleu1", "cmexam/expl_bleu4", "cmexam/expl_rouge1", "cmexam/expl_rouge2",
                "cmexam/expl_rougeL"} <= set(arts[name]["metrics"])
    assert (arts["03-ceval_cpt"]["evaluated_stage"], arts["06-ceval_sft"]["evaluated_stage"]) == ("cpt", "sft")
    assert arts["08-eval"]["evaluated_stage"] == "dpo"
    assert {f"sft_alpaca/{m}" for m in ("bleu1", "bleu4", "rouge1", "rouge2", "rougeL")} <= set(arts["08-eval"]["metrics"])
    assert arts["01-cpt"]["format"] == "full"
    assert arts["04-sft"]["format"] == "adapter" and arts["07-dpo"]["format"] == "adapter"
    # sft trained on top of cpt's output, dpo on top of sft's merged output
    assert arts["04-sft"]["base_model_path"] == arts["01-cpt"]["model_path"]
    assert arts["07-dpo"]["base_model_path"].endswith("/merged")
    assert Path(arts["07-dpo"]["base_model_path"]).parent == Path(arts["04-sft"]["model_path"]).parent
    inputs = {"01-cpt": ensure_tiny(), "04-sft": arts["04-sft"]["base_model_path"],
              "07-dpo": arts["07-dpo"]["base_model_path"]}
    for name, input_path in inputs.items():
        art = arts[name]
        assert art["metrics"]["last_loss"] < art["metrics"]["first_loss"], (name, art["metrics"])
        assert_trained_on(art, input_path)
    assert "Stage 8/8" in out and "Pipeline qilin complete" in out
    assert (run_dir / "config.yaml").is_file() and (run_dir / "run.json").is_file()
    assert list((run_dir / "01-cpt" / "tensorboard").glob("events.out.tfevents.*"))


def test_dpo_reward_accuracy_rose(qilin):
    m = artifacts(qilin[1])["07-dpo"]["metrics"]
    # at step 0 the policy is the reference: every reward is 0 and no pair is ranked right
    assert m["first_reward_accuracy"] == 0.0
    assert m["reward_accuracy"] > m["first_reward_accuracy"] and m["reward_margin"] > 0, m


def _completion_logps(model, probe) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, probe["input_ids"][:, 1:, None])[..., 0]
    total = (logp * probe["completion_mask"][:, 1:]).sum(1)
    return total.chunk(2)


def test_dpo_reference_is_the_sft_model_not_the_base(qilin):
    from transformers import AutoModelForCausalLM

    arts = artifacts(qilin[1])
    probe = torch.load(Path(arts["07-dpo"]["model_path"]).parent / "ref_probe.pt")
    sft = AutoModelForCausalLM.from_pretrained(arts["07-dpo"]["base_model_path"])  # merged SFT artifact
    cpt = AutoModelForCausalLM.from_pretrained(arts["01-cpt"]["model_path"])  # the model before SFT
    sft_c, sft_r = _completion_logps(sft, probe)
    cpt_c, _ = _completion_logps(cpt, probe)
    assert torch.allclose(probe["ref_chosen_logps"], sft_c, atol=1e-3)
    assert torch.allclose(probe["ref_rejected_logps"], sft_r, atol=1e-3)
    assert not torch.allclose(probe["ref_chosen_logps"], cpt_c, atol=1e-1)


def test_merged_weights_equal_base_plus_scaled_lora(qilin):
    from safetensors.torch import load_file

    arts = artifacts(qilin[1])
    sft = arts["04-sft"]
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
    assert again.code == 0 and again.out.count("✓ reused") == len(STAGES), again.out
    assert {n: a["created"] for n, a in artifacts(run_dir).items()} == before

    changed = medpipe("run", "recipe=qilin", f"run.root={root}", *QUICK, "stages.dpo.beta=0.3")
    assert changed.code == 0 and changed.out.count("✓ reused") == 6, changed.out  # cpt, sft + their evals; dpo, eval rerun
    changed = medpipe("run", "recipe=qilin", f"run.root={root}", *QUICK, "stages.sft.lr=1e-3")
    assert changed.code == 0 and changed.out.count("✓ reused") == 3, changed.out  # only cpt and its two evals


def test_status_reports_each_stage(qilin):
    r = medpipe("status", str(qilin[1]))
    assert r.code == 0
    assert r.out.count("done") == len(STAGES) and "pending" not in r.out and "failed" not in r.out


def test_only_and_force_keep_previous_results(qilin):
    root, run_dir, _ = qilin
    r = medpipe("run", "recipe=qilin", f"run.root={root}", f"run.dir={run_dir}", *QUICK, "--only", "dpo", "--force")
    assert r.code == 0, r.out
    assert "previous result kept at" in r.out and r.out.count("Stage ") == 1
    store = Path(json.loads((run_dir / "run.json").read_text())["stages"][STAGES.index("07-dpo")]["store_dir"]).parent
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

    root, _, _ = qilin
    show = medpipe("show", "recipe=qilin", f"run.root={root}", *QUICK)
    assert show.out.count("reuse finished result") == len(STAGES), show.out
    before = set((root / ".store").glob("dpo-*"))
    r = medpipe("run", "recipe=qilin", f"run.root={root}", *QUICK, "stages.dpo.beta=0.05,0.5", "--multirun")
    assert r.code == 0, r.out
    assert "sweep 1/2" in r.out and "sweep 2/2" in r.out
    assert r.out.count("✓ reused") == 12  # cpt and sft and their four evals, in both runs
    new = set((root / ".store").glob("dpo-*")) - before
    assert len([p for p in new if "replaced" not in p.name]) == 2
    runs = sorted(p for p in root.glob("qilin-*") if (p / "run.json").exists())[-2:]
    shutil.rmtree(runs[0])  # deleting one run never breaks another that shares its stages
    kept = {stage: json.loads((runs[1] / stage / "artifact.json").read_text()) for stage in ("01-cpt", "04-sft", "07-dpo")}
    assert_trained_on(kept["04-sft"], kept["01-cpt"]["model_path"])
    assert_trained_on(kept["07-dpo"], kept["04-sft"]["model_path"])
