"""IIMedGPT recipe: the SFT mix (instructions + single-turn : multi-turn dialogue = 1 : 1, §3.1.2),
and end to end: held-out best checkpoint, the halve-the-loss spike guard, DPO."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from conftest import medpipe, read_artifact


def sft_mix() -> tuple[list[dict], list[dict]]:
    from medpipe.compose import bind_stages, compose
    from medpipe.data import load_records

    cfg, _ = compose("iimedgpt", [])
    sft = {p.name: p for p in bind_stages(cfg)}["sft"].params
    loaded = load_records(sft.data, "chat", heldout=sft.heldout)
    return loaded.records, loaded.heldout


def answers(record: dict) -> int:
    return sum(m["role"] == "assistant" for m in record["messages"])


def test_sft_mix_is_one_to_one_between_single_and_multi_turn_dialogue():
    train, heldout = sft_mix()
    by = Counter(r["task"] for r in train)
    assert set(by) == {"instructions", "single_turn_dialogue", "multi_turn_dialogue"}
    assert by["single_turn_dialogue"] == by["multi_turn_dialogue"]  # the paper's 1 : 1 (training split)
    assert all(answers(r) == 1 for r in train if r["task"] == "single_turn_dialogue")
    assert all(answers(r) > 1 for r in train if r["task"] == "multi_turn_dialogue")
    assert len(heldout) == round(0.1 * (len(train) + len(heldout)))  # §4.1 "approximately 10%"


@pytest.mark.slow
def test_iimedgpt_runs_end_to_end(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "runs" / "ii"
    r = medpipe("run", "recipe=iimedgpt", f"run.root={tmp_path}/runs", f"run.dir={run_dir}",
                "stages.sft.max_steps=12", "stages.sft.eval_steps=6", "stages.sft.logging_steps=2",
                "stages.dpo.max_steps=8", "stages.dpo.logging_steps=2",
                # the reward metrics over the pairs whose reference log-probs ref_probe.pt keeps (one eval batch)
                "stages.dpo.reward_eval_pairs=8", "stages.dpo.ref_probe=8")
    assert r.code == 0, r.out
    sft = read_artifact(run_dir / "02-sft")
    dpo = read_artifact(run_dir / "04-dpo")
    m = sft["metrics"]
    assert m["heldout"] > 0 and m["best_eval_loss"] <= m["last_eval_loss"]  # 10 % held out, best kept
    assert (m["spike_guard_skipped"], m["spike_guard_halved"]) == (0, 0)  # guard on, nothing to guard on clean data
    assert m["last_loss"] < m["first_loss"]
    train, _ = sft_mix()
    assert m["conversations_multi_turn"] == sum(answers(r) > 1 for r in train)
    margin = reward_margin_from_the_saved_models(sft, dpo, run_dir / "04-dpo" / "ref_probe.pt", beta=0.1)
    assert dpo["metrics"]["reward_margin"] == pytest.approx(margin, rel=1e-3, abs=1e-6)
    assert margin > 0  # DPO moved the policy toward the chosen answers (0 at the start: policy = reference)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        logits = {name: AutoModelForCausalLM.from_pretrained(path).eval()(input_ids=ids).logits
                  for name, path in (("base", sft["base_model_path"]), ("sft", sft["model_path"]),
                                     ("dpo", dpo["model_path"]))}
    assert (logits["sft"] - logits["base"]).abs().max() > 1e-3 and (logits["dpo"] - logits["sft"]).abs().max() > 1e-5


def reward_margin_from_the_saved_models(sft: dict, dpo: dict, probe_path, beta: float) -> float:
    """DPO's reward margin recomputed outside TRL: β · mean[(log π(chosen) − log ref(chosen)) −
    (log π(rejected) − log ref(rejected))] over the probe's pairs, log-probs summed over the
    completion tokens, π = the DPO stage's merged model. The reference log-probs recomputed with
    the SFT model must equal those TRL recorded in the probe (the method is checked on them)."""
    import torch
    from transformers import AutoModelForCausalLM

    probe = torch.load(probe_path)
    ids, mask, completion = probe["input_ids"], probe["attention_mask"], probe["completion_mask"]

    def logps(path: str) -> tuple[torch.Tensor, torch.Tensor]:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        per_token = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        return (per_token * completion[:, 1:]).sum(-1).chunk(2)  # rows: the chosen, then the rejected

    ref_c, ref_r = logps(sft["merged_path"] or sft["model_path"])
    torch.testing.assert_close(ref_c, probe["ref_chosen_logps"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ref_r, probe["ref_rejected_logps"], rtol=1e-4, atol=1e-3)
    pol_c, pol_r = logps(dpo["merged_path"] or dpo["model_path"])
    return float(beta * ((pol_c - probe["ref_chosen_logps"]) - (pol_r - probe["ref_rejected_logps"])).mean())
