"""The qilin chain end to end on the tiny model: artifacts, handoff, skip/rerun, DPO reference."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import QUICK, medpipe, read_artifact

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def qilin(tmp_path_factory):
    root = tmp_path_factory.mktemp("qilin") / "runs"
    r = medpipe("run", "recipe=qilin", f"run.root={root}", f"run.dir={root}/main", *QUICK)
    assert r.code == 0, r.out
    return root, root / "main", r.out


def artifacts(run_dir: Path) -> dict:
    return {d.name: read_artifact(d) for d in sorted(run_dir.iterdir())
            if (d / "artifact.json").exists()}


STAGES = ["01-cmexam_base", "02-ceval_base", "03-huatuo_base", "04-cpt", "05-cmexam_cpt", "06-ceval_cpt", "07-huatuo_cpt",
          "08-sft", "09-cmexam_sft", "10-ceval_sft", "11-huatuo_sft", "12-dpo", "13-eval"]
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
    # the paper's tables: CMExam accuracy + explanation BLEU/ROUGE and C-Eval 5-shot on the base model,
    # after CPT and after SFT; Huatuo-26M BLEU/ROUGE on the base model and after CPT, SFT and DPO
    for name, evaluated in (("01-cmexam_base", "base"), ("05-cmexam_cpt", "cpt"), ("09-cmexam_sft", "sft")):
        assert arts[name]["evaluated_stage"] == evaluated
        assert {"cmexam/acc", "cmexam/expl_bleu1", "cmexam/expl_bleu4", "cmexam/expl_rouge1", "cmexam/expl_rouge2",
                "cmexam/expl_rougeL"} <= set(arts[name]["metrics"])
    assert [arts[n]["evaluated_stage"] for n in ("02-ceval_base", "06-ceval_cpt", "10-ceval_sft")] == ["base", "cpt", "sft"]
    for name, evaluated in (("03-huatuo_base", "base"), ("07-huatuo_cpt", "cpt"), ("11-huatuo_sft", "sft"),
                            ("13-eval", "dpo")):
        assert arts[name]["evaluated_stage"] == evaluated
        assert {f"huatuo26m_test/{m}" for m in ("bleu1", "bleu4", "rouge1", "rouge2", "rougeL")} <= set(arts[name]["metrics"])
    assert arts["04-cpt"]["format"] == "full"
    assert arts["08-sft"]["format"] == "adapter" and arts["12-dpo"]["format"] == "adapter"
    # sft trained on top of cpt's output, dpo on top of sft's merged output
    assert arts["08-sft"]["base_model_path"] == arts["04-cpt"]["model_path"]
    assert arts["12-dpo"]["base_model_path"].endswith("/merged")
    assert Path(arts["12-dpo"]["base_model_path"]).parent == Path(arts["08-sft"]["model_path"]).parent
    inputs = {"04-cpt": ensure_tiny(), "08-sft": arts["08-sft"]["base_model_path"],
              "12-dpo": arts["12-dpo"]["base_model_path"]}
    for name, input_path in inputs.items():
        art = arts[name]
        assert art["metrics"]["last_loss"] < art["metrics"]["first_loss"], (name, art["metrics"])
        assert_trained_on(art, input_path)
    assert "Stage 13/13" in out and "Pipeline qilin complete" in out
    assert (run_dir / "config.yaml").is_file() and (run_dir / "run.json").is_file()
    assert list((run_dir / "04-cpt" / "tensorboard").glob("events.out.tfevents.*"))


def test_dpo_reward_accuracy_rose(qilin):
    m = artifacts(qilin[1])["12-dpo"]["metrics"]
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
    probe = torch.load(Path(arts["12-dpo"]["model_path"]).parent / "ref_probe.pt")
    sft = AutoModelForCausalLM.from_pretrained(arts["12-dpo"]["base_model_path"])  # merged SFT artifact
    cpt = AutoModelForCausalLM.from_pretrained(arts["04-cpt"]["model_path"])  # the model before SFT
    sft_c, sft_r = _completion_logps(sft, probe)
    cpt_c, _ = _completion_logps(cpt, probe)
    assert torch.allclose(probe["ref_chosen_logps"], sft_c, atol=1e-3)
    assert torch.allclose(probe["ref_rejected_logps"], sft_r, atol=1e-3)
    assert not torch.allclose(probe["ref_chosen_logps"], cpt_c, atol=1e-1)


def test_merged_weights_equal_base_plus_scaled_lora(qilin):
    from safetensors.torch import load_file

    arts = artifacts(qilin[1])
    sft = arts["08-sft"]
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
    assert changed.code == 0 and changed.out.count("✓ reused") == 11, changed.out  # base evals, cpt, sft + evals; dpo, eval rerun
    changed = medpipe("run", "recipe=qilin", f"run.root={root}", *QUICK, "stages.sft.lr=1e-3")
    assert changed.code == 0 and changed.out.count("✓ reused") == 7, changed.out  # base evals, cpt and its three evals


def test_status_reports_each_stage(qilin):
    r = medpipe("status", str(qilin[1]))
    assert r.code == 0
    assert r.out.count("done") == len(STAGES) and "pending" not in r.out and "failed" not in r.out


def test_only_and_force_keep_previous_results(qilin):
    root, run_dir, _ = qilin
    r = medpipe("run", "recipe=qilin", f"run.root={root}", f"run.dir={run_dir}", *QUICK, "--only", "dpo", "--force")
    assert r.code == 0, r.out
    assert "previous result kept at" in r.out and r.out.count("Stage ") == 1
    store = Path(json.loads((run_dir / "run.json").read_text())["stages"][STAGES.index("12-dpo")]["store_dir"]).parent
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
    assert r.out.count("✓ reused") == 22  # the base evals, cpt and sft and their six evals, in both runs
    new = set((root / ".store").glob("dpo-*")) - before
    assert len([p for p in new if "replaced" not in p.name]) == 2
    runs = sorted(p for p in root.glob("qilin-*") if (p / "run.json").exists())[-2:]
    shutil.rmtree(runs[0])  # deleting one run never breaks another that shares its stages
    kept = {stage: read_artifact(runs[1] / stage) for stage in ("04-cpt", "08-sft", "12-dpo")}
    assert_trained_on(kept["08-sft"], kept["04-cpt"]["model_path"])
    assert_trained_on(kept["12-dpo"], kept["08-sft"]["model_path"])


def _row(out: str, metric: str) -> list[str]:
    line = next(x for x in out.splitlines() if x.startswith(metric + " "))
    return line.split()


def test_the_run_ends_with_the_before_after_table(qilin):
    """What each stage changed, readable from the terminal alone: held-out perplexity falls with CPT,
    the held-out answer loss falls with SFT, exams beside the paper's numbers, the chance note."""
    _, run_dir, out = qilin
    summary = out.split("Before → after: the base model, then each stage")[1]
    head = summary.splitlines()[1].split()
    assert head == ["metric", "base", "cpt", "sft", "dpo", "change", "paper", "paper", "change"]
    ppl = _row(summary, "heldout_text/ppl")
    assert float(ppl[2]) < float(ppl[1]) / 2  # CPT: perplexity of held-out documents at least halves
    loss = _row(summary, "heldout_chat/loss")
    assert float(loss[3]) < float(loss[2])  # SFT: the answer loss on held-out conversations falls
    assert float(loss[5]) == pytest.approx(float(loss[4]) - float(loss[1]), abs=0.011)  # change = last − first
    acc = " ".join(_row(summary, "cmexam/acc"))
    assert "33.5 (base) → 38.4 (cpt) → 40 (sft) +6.50" in acc
    assert ("paper (Table 5): Baichuan-7B on CMExam test; this run: tiny on the 60-item bundled sample "
            "(model and data differ)") in summary
    assert "note: the tiny model is randomly initialised, so its exam accuracies sit at chance" in summary
    r = medpipe("report", str(run_dir))
    assert r.code == 0 and (run_dir / "report.csv").read_text().startswith("metric,base,cpt,sft,dpo,change,paper,")


def test_a_fresh_machine_builds_the_tiny_model_quietly(tmp_path):
    """DeepSpeed's accelerator warning and transformers' shard bar go to the build log."""
    import os

    from conftest import medpipe_proc

    r = medpipe_proc("validate", "recipe=iimedgpt", env={**os.environ, "MEDPIPE_CACHE": str(tmp_path)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Setting accelerator" not in r.stdout + r.stderr and "Writing model shards" not in r.stdout + r.stderr
    logs = list(tmp_path.glob("tiny-*.build.log"))
    assert len(logs) == 1 and "Writing model shards" in logs[0].read_text()
