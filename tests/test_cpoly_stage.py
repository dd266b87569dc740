"""The cpoly stage (multi-task MCQ adaptation with C-Poly or LoRA) and the voc_label stage, on the
tiny model: mixed-task batches, artifact, per-task merged models, LoRA override, VoC pseudo-labels
handed to cpoly, and a 2-process DeepSpeed run."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import medpipe, run_on_two_ranks, zero2_stage, read_artifact

MCQ = '["${data.pubmedqa}", "${data.medmcqa}", "${data.medqa}"]'
RECIPE = """
defaults: [base, model: tiny, data: sample, stage/cpoly@stages.cpoly, _self_]
name: cp
stages:
  cpoly: {data: %s, lr: 5e-3, max_steps: 16, logging_steps: 2, batch_size: 4, max_length: 160,
          save_steps: 8, default_task: pubmedqa}
""" % MCQ


def artifact(run_dir: Path, stage: str) -> dict:
    return read_artifact(run_dir / stage)


@pytest.fixture(scope="module")
def cpoly_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpoly")
    recipe = root / "cp.yaml"
    recipe.write_text(RECIPE)
    r = medpipe("run", f"recipe={recipe}", f"run.root={root}/runs", f"run.dir={root}/runs/main")
    assert r.code == 0, r.out
    return root, root / "runs" / "main", r.out


# --- units (fast) -----------------------------------------------------------------------------------
def tiny_tokenizer():
    from transformers import AutoTokenizer

    from medpipe.stages.models import tiny

    return AutoTokenizer.from_pretrained(tiny.ensure_tiny())


def test_ppl_encoding_labels_only_the_answer_and_collator_emits_task_ids():
    from medpipe.stages.cpoly import CPolyParams, encode
    from medpipe.stages.training.cpoly import TaskCollator
    from medpipe.stages.evaluation.prompts import build_ppl_prompt

    tok = tiny_tokenizer()
    recs = [{"id": "1", "question": "Is X useful?", "context": "X helps.", "options": {"A": "yes", "B": "no"},
             "answer": ["B"], "task": "pubmedqa"},
            {"id": "2", "question": "Pick one", "context": None, "options": {"A": "aspirin", "B": "heparin"},
             "answer": ["A"], "task": "medqa"}]
    ds = encode(recs, ["medqa", "pubmedqa"], tok, CPolyParams(max_length=64))
    assert ds["task_id"] == [1, 0]
    for row, rec in zip(ds, recs):
        prompt, conts = build_ppl_prompt(rec)
        answer = [t for t in row["labels"] if t != -100]
        assert row["input_ids"][-len(answer):] == answer  # the labelled span is the end: answer + eos
        assert answer == tok(conts[rec["answer"][0]], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert tok.decode(row["input_ids"][:-len(answer)]) == prompt
    col = TaskCollator(tok.pad_token_id, with_task_ids=True)
    batch = col(list(ds))
    assert batch["task_ids"].tolist() == [1, 0] and col.mixed == 1
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert "task_ids" not in TaskCollator(tok.pad_token_id, with_task_ids=False)(list(ds))
    # too long: the prompt is cut from the left, the answer kept
    short = encode(recs[:1], ["pubmedqa"], tok, CPolyParams(max_length=6))[0]
    assert len(short["input_ids"]) == 6 and short["labels"][-1] == tok.eos_token_id


def test_bad_params_are_refused_before_training(tmp_path):
    recipe = tmp_path / "cp.yaml"
    recipe.write_text(RECIPE)
    for override, msg in (("stages.cpoly.adapter=dora", "adapter must be one of"),
                          ("stages.cpoly.peft={r:8}", "`peft` configures the LoRA baseline"),
                          ("stages.cpoly.default_task=mmlu", "'mmlu'"),
                          ("stages.cpoly.tasks=[pubmedqa]", "not in tasks")):
        r = medpipe("run", f"recipe={recipe}", f"run.root={tmp_path}/runs", override)
        assert r.code == 2 and msg in r.out, (override, r.out)


# --- cpoly end to end (slow) -------------------------------------------------------------------------
@pytest.mark.slow
def test_mixed_task_training_lowers_the_loss(cpoly_run):
    _, run_dir, out = cpoly_run
    art = artifact(run_dir, "01-cpoly")
    m = art["metrics"]
    assert art["format"] == "full" and art["handoff"]["cpoly"]["adapter"] == "cpoly"
    assert art["handoff"]["cpoly"]["tasks"] == ["medmcqa", "medqa", "pubmedqa"]
    assert m["last_loss"] < m["first_loss"], m
    assert (m["examples_pubmedqa"], m["examples_medmcqa"], m["examples_medqa"]) == (40, 40, 60)
    assert m["mixed_task_batches"] >= m["steps"]  # every batch held several tasks
    assert art["model_path"] == art["task_models"]["pubmedqa"]  # default_task
    assert "140 examples over 3 task(s)" in out


@pytest.mark.slow
def test_artifact_loads_and_each_merged_model_equals_the_cpoly_model_with_its_task(cpoly_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medpipe.stages.adapters.cpoly import load_cpoly

    art = artifact(cpoly_run[1], "01-cpoly")
    ex = {**art["handoff"]["cpoly"], "merged": art["task_models"]}
    cfg = json.loads((Path(ex["adapter_dir"]) / "cpoly_config.json").read_text())
    assert cfg["tasks"] == ex["tasks"] and cfg["config"]["n_shared_skills"] == 4 and cfg["config"]["r"] == 4
    tok = AutoTokenizer.from_pretrained(ex["adapter_dir"])
    enc = tok(["Context: Aspirin lowers fever.\nQuestion: Does aspirin lower fever?\nAnswer: yes",
               "Question: First-line treatment of peptic ulcer?\nAnswer:"], return_tensors="pt", padding=True)
    cm = load_cpoly(AutoModelForCausalLM.from_pretrained(ex["base"]), ex["adapter_dir"])
    assert not cm.training
    logits = {}
    with torch.no_grad():
        for task in ex["tasks"]:
            plain = AutoModelForCausalLM.from_pretrained(ex["merged"][task]).eval()
            merged = plain(**enc).logits
            logits[task] = cm(**enc, task_ids=[task, task]).logits
            assert (merged - logits[task]).abs().max().item() < 1e-5, task
        # per-example routing in one mixed batch = each example run with its own task
        mixed = cm(**enc, task_ids=["pubmedqa", "medqa"]).logits
    assert torch.allclose(mixed[0], logits["pubmedqa"][0], atol=1e-5)
    assert torch.allclose(mixed[1], logits["medqa"][1], atol=1e-5)
    assert (logits["pubmedqa"] - logits["medqa"]).abs().max() > 1e-3  # the tasks did diverge


@pytest.mark.slow
def test_resume_from_a_checkpoint_gives_the_same_weights(cpoly_run, tmp_path):
    import shutil

    from medpipe.entry import run_stage_file

    src = (cpoly_run[1] / "01-cpoly").resolve()
    spec = json.loads((src / "stage.json").read_text())
    (tmp_path / "checkpoints").mkdir()
    shutil.copytree(src / "checkpoints" / "checkpoint-8", tmp_path / "checkpoints" / "checkpoint-8")
    spec["output_dir"] = str(tmp_path)
    (tmp_path / "stage.json").write_text(json.dumps(spec))
    art = run_stage_file(tmp_path / "stage.json")
    assert art.metrics["resumed_from"] == "checkpoint-8"
    assert art.metrics["weights_sha256"] == read_artifact(src)["metrics"]["weights_sha256"]


@pytest.mark.slow
def test_lora_baseline_is_one_override_away(cpoly_run):
    from transformers import AutoModelForCausalLM

    root = cpoly_run[0]
    r = medpipe("run", f"recipe={root}/cp.yaml", f"run.root={root}/runs", f"run.dir={root}/runs/lora",
                "stages.cpoly.adapter=lora", "stages.cpoly.max_steps=4")
    assert r.code == 0, r.out
    art = artifact(root / "runs" / "lora", "01-cpoly")
    assert art["format"] == "adapter" and art["handoff"]["cpoly"]["adapter"] == "lora"
    cfg = json.loads((Path(art["model_path"]) / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert art["metrics"]["trainable_params"] < artifact(cpoly_run[1], "01-cpoly")["metrics"]["trainable_params"]
    ids = torch.tensor([[5, 9, 13, 2]])
    with torch.no_grad():  # the adapter loads through PEFT onto its base and changed the model
        trained = AutoModelForCausalLM.from_pretrained(art["model_path"]).eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(art["base_model_path"]).eval()(input_ids=ids).logits
    assert torch.isfinite(trained).all() and (trained - base).abs().max() > 1e-4


# --- voc_label (stub generation) ---------------------------------------------------------------------
def write_pqa_u(path: Path, n: int = 6) -> None:
    """PQA-U as on the Hub (pqa_unlabeled parquet): no final_decision column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"pubid": 1000 + i, "question": f"Does treatment {i} help condition {i}?",
             "context": {"contexts": [f"We studied treatment {i} in 100 patients.", "Outcomes were measured."],
                         "labels": ["METHODS", "RESULTS"], "meshes": ["Humans"]},
             "long_answer": f"Treatment {i} improved condition {i} in most patients."} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), path)


def stub_generate(prompts, model, tok, **kw):
    """Final step: item 0,1,2 → a clean answer, 3 → no answer, 4 → conflicting, 5 → a letter not offered."""
    out = []
    for p in prompts:
        if "final response" not in p:
            out.append("because the context says so")
            continue
        i = int(re.findall(r"treatment (\d+)", p)[0])
        out.append({0: "Answer: A", 1: "Answer: B", 2: "answer: (C)", 3: "I am not sure.",
                    4: "Answer: A. No wait, Answer: B", 5: "Answer: D"}[i])
    return out


VOC_RECIPE = """
defaults: [base, model: tiny, data: sample, stage/voc_label@stages.voc, stage/cpoly@stages.cpoly, _self_]
name: voc
stages:
  voc: {data: {path: "%s", format: pubmedqa}, max_new_tokens: 4, final_max_new_tokens: 4}
  cpoly: {data: ["${data.medmcqa}"], input_dataset: require, lr: 5e-3, max_steps: 2, batch_size: 8, max_length: 128}
"""


@pytest.mark.slow
def test_voc_label_counts_and_hands_its_dataset_to_cpoly(tmp_path, monkeypatch):
    from medpipe.stages.evaluation import voc

    monkeypatch.setattr(voc, "generate_texts", lambda model, tok, prompts, **kw: stub_generate(prompts, model, tok))
    write_pqa_u(tmp_path / "pqa_u.parquet")
    recipe = tmp_path / "voc.yaml"
    recipe.write_text(VOC_RECIPE % (tmp_path / "pqa_u.parquet"))
    run_dir = tmp_path / "runs" / "v"
    r = medpipe("run", f"recipe={recipe}", f"run.root={tmp_path}/runs", f"run.dir={run_dir}")
    assert r.code == 0, r.out
    voc = artifact(run_dir, "01-voc")
    m = voc["metrics"]
    assert (m["items"], m["labeled"], m["unparseable"]) == (6, 3, 3)
    assert (m["unparseable_no_answer"], m["unparseable_conflicting"], m["unparseable_invalid_letter"]) == (1, 1, 1)
    assert (m["label_A"], m["label_B"], m["label_C"]) == (1, 1, 1)
    rows = [json.loads(x) for x in Path(voc["dataset_path"]).read_text().splitlines()]
    assert sorted((r["id"], r["answer"], r["task"]) for r in rows) == [("1000", ["A"], "pubmedqa"), ("1001", ["B"], "pubmedqa"),
                                                                  ("1002", ["C"], "pubmedqa")]
    assert all(r["label_source"] == "voc" and r["options"] == {"A": "yes", "B": "no", "C": "maybe"} for r in rows)
    bad = [json.loads(x) for x in (run_dir / "01-voc" / "unparseable.jsonl").read_text().splitlines()]
    assert {b["id"]: b["parse_detail"] for b in bad} == {"1003": "no_answer", "1004": "conflicting",
                                                        "1005": "invalid_letter"}
    assert len((run_dir / "01-voc" / "traces.jsonl").read_text().splitlines()) == 6
    # the model passes through; cpoly trained on the sample + the 3 pseudo-labelled items
    cp = artifact(run_dir, "02-cpoly")
    assert cp["handoff"]["cpoly"]["base"] == voc["model_path"]
    assert cp["metrics"]["input_dataset_records"] == 3 and cp["handoff"]["cpoly"]["tasks"] == ["medmcqa", "pubmedqa"]
    assert cp["metrics"]["examples_pubmedqa"] == 3


@pytest.mark.slow
def test_voc_label_relabel_reports_agreement_and_refuses_an_empty_job(tmp_path, monkeypatch):
    from medpipe.stages.evaluation import voc
    from medpipe.data import load_records

    monkeypatch.setattr(voc, "generate_texts",
                        lambda model, tok, prompts, **kw: ["Answer: A" if "final response" in p else "so" for p in prompts])
    recipe = tmp_path / "voc.yaml"
    recipe.write_text("defaults: [base, model: tiny, data: sample, stage/voc_label@stages.voc, _self_]\nname: v\n"
                      "stages:\n  voc: {data: '${data.pubmedqa}', max_new_tokens: 4}\n")
    r = medpipe("run", f"recipe={recipe}", f"run.root={tmp_path}/runs")  # labelled data, relabel off
    assert r.code == 2 and "nothing to label" in r.out
    r = medpipe("run", f"recipe={recipe}", f"run.root={tmp_path}/runs", f"run.dir={tmp_path}/runs/x",
                "stages.voc.relabel=true", "stages.voc.limit=10")
    assert r.code == 0, r.out
    m = artifact(tmp_path / "runs" / "x", "01-voc")["metrics"]
    gold = load_records({"path": "pubmedqa.json", "format": "pubmedqa"}, "mcq").records[:10]
    assert m["labeled"] == 10 and m["agreement_n"] == 10
    assert m["agreement"] == pytest.approx(sum(g["answer"] == ["A"] for g in gold) / 10)


@pytest.mark.slow
def test_long_answer_labelling_is_one_step_without_voc(tmp_path, monkeypatch):
    """AntGLM-Med Table 7's baseline: PQA-U labelled from the long answer alone (no plan/verify)."""
    from medpipe.stages.evaluation import voc

    asked = []

    def one_step(model, tok, prompts, **kw):
        asked.extend(prompts)
        return [{0: "Answer: B", 1: "Answer: C"}.get(int(re.findall(r"treatment (\d+)", p)[0]), "unsure") for p in prompts]

    monkeypatch.setattr(voc, "generate_texts", one_step)
    write_pqa_u(tmp_path / "pqa_u.parquet", n=3)
    recipe = tmp_path / "voc.yaml"
    recipe.write_text("defaults: [base, model: tiny, data: sample, stage/voc_label@stages.voc, _self_]\nname: v\n"
                      "stages:\n  voc: {data: {path: '%s', format: pubmedqa}, method: long_answer}\n"
                      % (tmp_path / "pqa_u.parquet"))
    run_dir = tmp_path / "runs" / "la"
    r = medpipe("run", f"recipe={recipe}", f"run.root={tmp_path}/runs", f"run.dir={run_dir}")
    assert r.code == 0, r.out
    assert len(asked) == 3  # one generation per item: no per-option plan, no verification
    assert asked[0] == ("Context: We studied treatment 0 in 100 patients.\nOutcomes were measured.\n"
                        "Long answer: Treatment 0 improved condition 0 in most patients.\n"
                        "Question: Does treatment 0 help condition 0?\nOptions:\nA. yes\nB. no\nC. maybe\n"
                        'Give the final response in the form "Answer: X", where X is one of A, B, C.\n')
    art = artifact(run_dir, "01-voc")
    assert (art["metrics"]["labeled"], art["metrics"]["unparseable"]) == (2, 1)
    rows = [json.loads(x) for x in Path(art["dataset_path"]).read_text().splitlines()]
    assert [(r["id"], r["answer"], r["label_source"]) for r in rows] == [("1000", ["B"], "long_answer"),
                                                                        ("1001", ["C"], "long_answer")]


# --- DeepSpeed (2 processes) -------------------------------------------------------------------------
def assert_trainable_only(ckpt: Path, trainable: dict, base_dir: str) -> None:
    """A DeepSpeed checkpoint dir holds the trainable tensors only (`trainable`: name -> tensor):
    the engine's module state has exactly those, no frozen-parameter copy, and its size is theirs;
    the whole dir is smaller than the base (it held the base twice: module state + ZeRO-2's frozen
    fragments)."""
    [states] = ckpt.glob("global_step*/mp_rank_00_model_states.pt")
    saved = torch.load(states, map_location="cpu", weights_only=False)
    assert set(saved["module"]) == set(trainable), sorted(set(saved["module"]) ^ set(trainable))[:5]
    assert not saved.get("frozen_param_fragments")
    tensor_bytes = sum(t.numel() * t.element_size() for t in trainable.values())
    assert states.stat().st_size < 1.1 * tensor_bytes + 64 * 1024, (states.stat().st_size, tensor_bytes)
    assert not list(ckpt.glob("model*.safetensors"))
    base_bytes = sum(f.stat().st_size for f in Path(base_dir).glob("*.safetensors"))
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    assert ckpt_bytes < base_bytes, (ckpt_bytes, base_bytes)


def rerun_from(run_dir: Path, link: str, ckpt: str, rerun) -> dict:
    """Drop the stage's artifact and every checkpoint after `ckpt`, run again: the stage resumes
    from `ckpt`. Returns the new artifact."""
    import shutil

    sdir = (run_dir / link).resolve()
    (sdir / "artifact.json").unlink()
    step = int(ckpt.rsplit("-", 1)[1])
    for later in (sdir / "checkpoints").glob("checkpoint-*"):
        if int(later.name.rsplit("-", 1)[1]) > step:
            shutil.rmtree(later)
    rerun()
    return artifact(run_dir, link)


@pytest.mark.slow
@pytest.mark.distributed
def test_cpoly_under_deepspeed_zero2_on_two_processes(tmp_path):
    from medpipe.stages.models.tiny import ensure_tiny

    recipe = RECIPE.replace("max_steps: 16", "max_steps: 3").replace("save_steps: 8", "save_steps: 2")
    run_dir = run_on_two_ranks(tmp_path, recipe, port=29547)
    art = zero2_stage(run_dir, "01-cpoly")
    from safetensors.torch import load_file

    tensors = load_file(str(Path(art["handoff"]["cpoly"]["adapter_dir"]) / "cpoly_adapter.safetensors"))
    assert max(v.abs().max().item() for k, v in tensors.items() if k.endswith("cpoly_B")) > 0  # trained weights saved
    assert Path(art["model_path"], "config.json").is_file()

    # the checkpoint holds the adapter (the CPolyModel's `model.` + layer path), not the frozen base
    ckpt = (run_dir / "01-cpoly").resolve() / "checkpoints" / "checkpoint-2"
    assert_trainable_only(ckpt, {f"model.{k}": v for k, v in tensors.items()}, str(ensure_tiny()))
    # ... and the engine resumes from such a checkpoint: resumed from the last one (step 3 of 3) the
    # stage ends with exactly the trained weights, not the fresh ones. (Resumed from checkpoint-2,
    # step 3 comes out different from the uninterrupted run's under DeepSpeed — on main too, with
    # full checkpoints, bit for bit the same resumed weights as here.)
    again = rerun_from(run_dir, "01-cpoly", "checkpoint-3", lambda: run_on_two_ranks(tmp_path, recipe, port=29548))
    assert again["metrics"]["resumed_from"] == "checkpoint-3"
    assert again["metrics"]["weights_sha256"] == art["metrics"]["weights_sha256"]
