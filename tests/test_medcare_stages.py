"""MedCare stages: MKA → DA end to end, the exported model equals base + KA + Align, the
orthogonal loss falls, and its weight does not change with gradient accumulation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from conftest import medpipe, read_artifact
from medpipe.stages.adapters import medcare, medcare_io
from medpipe.stages.models.tiny import ensure_tiny


@pytest.mark.slow
def test_medcare_recipe_end_to_end(tmp_path):
    run_dir = tmp_path / "runs" / "mc"
    r = medpipe("run", "recipe=medcare", f"run.root={tmp_path}/runs", f"run.dir={run_dir}",
                "stages.mka.max_steps=6", "stages.mka.logging_steps=2", "stages.da.max_steps=8", "stages.da.logging_steps=2")
    assert r.code == 0, r.out
    mka = read_artifact(run_dir / "04-mka")
    da = read_artifact(run_dir / "07-da")
    assert Path(mka["handoff"]["medcare"]["ka"], "medcare_ka.safetensors").is_file()
    assert da["metrics"]["last_orth_loss"] < da["metrics"]["first_orth_loss"]
    assert mka["metrics"]["last_loss"] < mka["metrics"]["first_loss"]

    # the exported DA model is a plain transformers model equal to base + KA + Align (unmerged)
    final = AutoModelForCausalLM.from_pretrained(da["model_path"]).eval()
    assert not any(isinstance(m, medcare.MedCareLinear) for m in final.modules())
    unmerged = medcare_io.load_medcare(AutoModelForCausalLM.from_pretrained(da["handoff"]["medcare"]["base"]),
                                    da["handoff"]["medcare"]["adapter"]).eval()
    ids = torch.randint(0, 1000, (2, 24))
    with torch.no_grad():
        assert torch.allclose(final(ids).logits, unmerged(ids).logits, atol=1e-5)

    # Table 3's "DA with NA kept": MKA reused, DA trains on with MKA's routed experts, and inference
    # (the stage's load_for_inference hook) runs base + KA + NA + Align
    from medpipe.stages.inference.runtime import LocalModel
    from medpipe.artifact import Artifact

    r = medpipe("run", "recipe=medcare", f"run.root={tmp_path}/runs", f"run.dir={tmp_path}/runs/na",
                "stages.mka.max_steps=6", "stages.mka.logging_steps=2", "stages.da.max_steps=4",
                "stages.da.logging_steps=2", "stages.da.keep_na=true")
    assert r.code == 0 and r.out.count("✓ reused") == 6 and "NA kept" in r.out, r.out
    na = Artifact.load((tmp_path / "runs" / "na" / "07-da").resolve())
    assert na.handoff["medcare"]["keep_na"] is True
    served = LocalModel.from_artifact(na).model
    layers = [m for _, m in medcare.medcare_modules(served)]
    assert layers and all(m.mode == "da_na" and m.cfg.keep_na for m in layers)
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(na.model_path).eval()(ids).logits  # NA dropped
        assert (served(ids).logits - plain).abs().max() > 1e-6  # the routed experts are in use


class GradSnapshot(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        control.should_training_stop = True


def _one_step_grads(tmp_path, batch_size: int, accum: int, orth_lambda: float) -> dict:
    from trl import SFTConfig

    from medpipe.stages.training.medcare import MedCareTrainer

    torch.manual_seed(0)
    path = ensure_tiny()
    tok = AutoTokenizer.from_pretrained(path)
    model = medcare.inject_da(AutoModelForCausalLM.from_pretrained(path),
                              medcare.MedCareConfig(r=4, alpha=8, s=2, align_dropout=0.0))
    with torch.no_grad():  # non-zero B so CE reaches every adapter too
        for _, m in medcare.medcare_modules(model):
            m.ka_B.normal_(0, 0.01)
    rows = [{"input_ids": list(range(10 + i, 30 + i)), "assistant_masks": [0] * 5 + [1] * 15} for i in range(4)]
    snap = GradSnapshot()
    args = SFTConfig(output_dir=str(tmp_path / f"o{batch_size}{accum}{orth_lambda}"), per_device_train_batch_size=batch_size,
                     gradient_accumulation_steps=accum, max_steps=1, learning_rate=1e-3, max_grad_norm=0,
                     report_to=[], use_cpu=True, bf16=False, save_strategy="no", seed=0, data_seed=0)
    trainer = MedCareTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                             callbacks=[snap], orth_lambda=orth_lambda)
    trainer.train()
    return snap.grads


def test_orthogonal_term_weight_is_independent_of_gradient_accumulation(tmp_path):
    one = _one_step_grads(tmp_path, batch_size=4, accum=1, orth_lambda=1.0)
    two = _one_step_grads(tmp_path, batch_size=2, accum=2, orth_lambda=1.0)
    without = _one_step_grads(tmp_path, batch_size=4, accum=1, orth_lambda=0.0)
    a_keys = [k for k in one if k.endswith(("ka_A", "align_A"))]
    assert a_keys and set(one) == set(two)
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-5, rtol=1e-4), k
    # the orthogonal term really contributes (else the check above would prove nothing)
    assert any(not torch.allclose(one[k], without[k], atol=1e-6) for k in a_keys)
    b_keys = [k for k in one if k.endswith(("ka_B", "align_B"))]
    for k in b_keys:  # ... and reaches the A matrices only
        assert torch.allclose(one[k], without[k], atol=1e-6), k


def test_checkpoints_carry_every_ffn_adapter_and_resume_restores_them(tmp_path):
    from trl import SFTConfig

    from medpipe.stages.training.medcare import FFN_ADAPTER_DIR, MedCareTrainer

    path = ensure_tiny()
    tok = AutoTokenizer.from_pretrained(path)
    rows = [{"input_ids": list(range(10 + i, 30 + i)), "assistant_masks": [0] * 5 + [1] * 15} for i in range(8)]

    def trainer(max_steps):
        model = medcare.inject_mka(AutoModelForCausalLM.from_pretrained(path), medcare.MedCareConfig(r=4, alpha=8))
        args = SFTConfig(output_dir=str(tmp_path / "ckpt"), per_device_train_batch_size=2, max_steps=max_steps,
                         learning_rate=1e-2, report_to=[], use_cpu=True, bf16=False, save_steps=2, seed=0)
        return MedCareTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)

    first = trainer(2)
    first.train()
    saved = tmp_path / "ckpt" / "checkpoint-2" / FFN_ADAPTER_DIR / medcare.ADAPTER_FILE
    assert saved.is_file()
    trained = {k: v.detach().clone() for k, v in medcare.adapter_state_dict(first.model).items()}
    assert any("router" in k for k in trained) and any("na_A" in k for k in trained)

    second = trainer(2)  # a fresh process would start here: fresh adapters, then resume
    fresh = medcare.adapter_state_dict(second.model)
    assert not all(torch.equal(fresh[k], trained[k]) for k in trained if "router" in k)
    second._load_from_checkpoint(str(saved.parent.parent))
    restored = medcare.adapter_state_dict(second.model)
    for k, v in trained.items():
        assert torch.equal(restored[k], v), k


def test_da_checkpoints_hold_the_adapters_only_and_resume_to_the_same_weights(tmp_path):
    """DA's model is no PeftModel: a checkpoint must not carry a copy of the frozen base (a 7B's
    whole weights per checkpoint), and a run resumed from one ends with the weights of a run that
    was never interrupted."""
    from safetensors import safe_open
    from trl import SFTConfig

    from medpipe.stages.training.medcare import MedCareTrainer

    path = ensure_tiny()
    tok = AutoTokenizer.from_pretrained(path)
    rows = [{"input_ids": list(range(10 + i, 30 + i)), "assistant_masks": [0] * 5 + [1] * 15} for i in range(8)]

    def trainer(out, max_steps):
        torch.manual_seed(0)
        model = medcare.inject_da(AutoModelForCausalLM.from_pretrained(path), medcare.MedCareConfig(r=4, alpha=8))
        args = SFTConfig(output_dir=str(tmp_path / out), per_device_train_batch_size=2, max_steps=max_steps,
                         learning_rate=1e-2, report_to=[], use_cpu=True, bf16=False, save_steps=2, seed=0,
                         data_seed=0, lr_scheduler_type="constant")
        return MedCareTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                              orth_lambda=1.0)

    straight = trainer("straight", 4)
    straight.train()
    ckpt = tmp_path / "straight" / "checkpoint-2"
    trainable = {n for n, p in straight.model.named_parameters() if p.requires_grad}
    saved = {}
    for f in ckpt.rglob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            saved.update({k: f.relative_to(ckpt) for k in st.keys()})
    assert set(saved) == trainable, sorted(set(saved) ^ trainable)[:5]  # the adapters, nothing of the base
    base_bytes = sum(p.numel() * p.element_size() for p in straight.model.parameters() if not p.requires_grad)
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    assert ckpt_bytes < base_bytes / 4, (ckpt_bytes, base_bytes)

    resumed = trainer("resumed", 4)
    resumed.train(resume_from_checkpoint=str(ckpt))
    want, got = medcare.adapter_state_dict(straight.model), medcare.adapter_state_dict(resumed.model)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_keep_na_ablation_loads_the_routed_experts_for_inference(tmp_path):
    from medpipe.artifact import Artifact
    from medpipe.stages.inference.runtime import LocalModel

    path = ensure_tiny()
    model = medcare.inject_mka(AutoModelForCausalLM.from_pretrained(path), medcare.MedCareConfig(r=4, alpha=8))
    with torch.no_grad():
        for _, m in medcare.medcare_modules(model):
            m.na_B.normal_(0, 0.05)  # make NA matter
    medcare_io.save_medcare(model, tmp_path / "adapter")
    art = Artifact(stage="mka", kind="medcare_mka", format="full", model_path=str(path), tokenizer_path=str(path),
                   handoff=medcare_io.MedCareHandoff(keep_na=True, adapter=str(tmp_path / "adapter"),
                                                  adapter_base=str(path)).record())
    local = LocalModel.from_artifact(art)
    layers = list(medcare.medcare_modules(local.model))
    assert layers and all(layer.cfg.keep_na for _, layer in layers)
    ids = torch.randint(0, 1000, (1, 12))
    plain = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        assert not torch.allclose(local.model(ids).logits, plain(ids).logits, atol=1e-4)  # NA is in use


def test_mka_balance_loss_counts_real_tokens_only(tmp_path, monkeypatch):
    """balance_coef > 0 in a padded batch: the routers' balance term sees the collator's attention
    mask (real tokens only), and the term is logged beside CE."""
    from trl import SFTConfig

    from medpipe.stages.training.medcare import MedCareTrainer

    seen = []
    original = medcare.MedCareLinear._balance_term

    def spy(self, probs, idx):
        seen.append((probs.shape[0], None if self._token_mask is None else int(self._token_mask.sum())))
        return original(self, probs, idx)

    monkeypatch.setattr(medcare.MedCareLinear, "_balance_term", spy)
    path = ensure_tiny()
    tok = AutoTokenizer.from_pretrained(path)
    model = medcare.inject_mka(AutoModelForCausalLM.from_pretrained(path),
                               medcare.MedCareConfig(r=4, alpha=8, n_experts=4, top_k=2, balance_coef=0.01))
    rows = [{"input_ids": list(range(10, 20)), "assistant_masks": [1] * 10},
            {"input_ids": list(range(30, 50)), "assistant_masks": [1] * 20}]
    args = SFTConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=2, max_steps=1, logging_steps=1,
                     report_to=[], use_cpu=True, bf16=False, save_strategy="no", seed=0)
    trainer = MedCareTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    trainer.train()
    assert seen and all(s == (40, 30) for s in seen), seen  # 2 rows padded to 20; 30 real tokens
    logged = [h for h in trainer.state.log_history if "balance_loss" in h]
    assert logged and logged[0]["balance_loss"] > 0


@pytest.mark.parametrize("override, needle", [
    ("stages.mka.medcare.top_k=9", "stages.mka: medcare.top_k must be between 1 and n_experts (8), got 9"),
    ("stages.mka.medcare.expert_dropout=1.5", "stages.mka: medcare.expert_dropout must be in [0, 1), got 1.5"),
    ("stages.mka.medcare.variant=both", "stages.mka: medcare.variant must be one of code, paper, got 'both'"),
    ("stages.da.orth_lambda=-1", "stages.da: orth_lambda must be >= 0 (0 = no orthogonal loss), got -1.0"),
    ("stages.da.medcare.align_rank=0", "medcare.align_rank must be >= 1 or null, got 0"),
])
def test_bad_medcare_settings_are_refused_before_training(tmp_path, override, needle):
    r = medpipe("validate", "recipe=medcare", override)
    assert r.code == 2 and needle in r.out, r.out
    assert "Traceback" not in r.out


DA_ZERO2 = """
defaults: [base, model: tiny, data: sample, stage/medcare_da@stages.da, _self_]
name: da_zero2
stages:
  da: {data: "${data.dialogue}", medcare: {r: 4, alpha: 8, s: 2}, lr: 5e-3, max_steps: 4, logging_steps: 1,
       batch_size: 4, max_length: 128, orth_lambda: 1.0, save_steps: 2}
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_da_orthogonal_term_under_deepspeed_zero2_on_two_processes(tmp_path):
    """DA (without MKA: KA and Align B start at zero, so the cross-entropy gives their A matrices
    no gradient at first and only the orthogonal term moves them) on 2 processes under ZeRO-2:
    the orthogonal loss falls, i.e. the term has a gradient there, and both replicas end identical
    (the published code's term reads detached copies under ZeRO-3 and gets none)."""
    from conftest import run_on_two_ranks, zero2_stage
    from test_cpoly_stage import assert_trainable_only, rerun_from

    recipe = DA_ZERO2 + f"data: {{cache_dir: {tmp_path / 'data-cache'}}}\n"  # no encoded data from other tests
    run_dir = run_on_two_ranks(tmp_path, recipe, port=29563)
    art = zero2_stage(run_dir, "01-da")
    sdir = (run_dir / "01-da").resolve()
    logs = {p.name: p.read_text() for p in (sdir / "logs").glob("rank*.log")}
    # the data is prepared once: the driver's check encoded it under the key the stage uses, so no
    # rank encodes again (without that cache, local rank 0 would, the others waiting for it)
    for log in logs.values():
        assert "chat data memory-mapped from the cache: 100 conversations" in log
    # checkpoints hold KA + Align (trainable), not the frozen base, and the engine resumes from them
    from safetensors.torch import load_file

    adapter = load_file(str(sdir / "medcare_adapter" / medcare.ADAPTER_FILE))
    assert_trainable_only(sdir / "checkpoints" / "checkpoint-2", adapter, str(ensure_tiny()))
    # resumed from the last checkpoint (step 4 of 4): exactly the trained weights (see the C-Poly test)
    again = rerun_from(run_dir, "01-da", "checkpoint-4", lambda: run_on_two_ranks(tmp_path, recipe, port=29564))
    assert again["metrics"]["resumed_from"] == "checkpoint-4"
    assert again["metrics"]["weights_sha256"] == art["metrics"]["weights_sha256"]
    m = art["metrics"]
    assert m["last_orth_loss"] < 0.9 * m["first_orth_loss"], m
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():  # the merged export loads as a plain model and carries the trained KA + Align
        merged = AutoModelForCausalLM.from_pretrained(art["model_path"]).eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(ensure_tiny()).eval()(input_ids=ids).logits
    assert torch.isfinite(merged).all() and (merged - base).abs().max() > 1e-5
