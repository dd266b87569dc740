"""The adapters in the precisions a GPU run uses, proven on CPU (issue 25, items 1 and 11).

* bf16 autocast (the local launcher and DDP with `precision: auto` on a GPU): every MedCare mode
  and C-Poly run forward + backward with fp32 and bf16 bases; the result is the fp32 result within
  bf16 tolerance (and the adapters' share of it is far larger than that tolerance, so dropping
  them would fail), and every trainable weight gets a gradient of its own dtype close to fp32's.
* bf16 weights without autocast (DeepSpeed's bf16 cast of the whole module): the routing math
  (MedCare's softmax/top-K gates, C-Poly's Gumbel-sigmoid noise) and the orthogonal loss are
  computed in fp32 all the same.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from medpipe.stages.adapters import medcare as mc
from medpipe.stages.adapters import medcare_io
from medpipe.stages.adapters.cpoly import CPolyConfig, CPolyLinear, _TaskState, inject_cpoly
from medpipe.stages.adapters.medcare import MedCareConfig, MedCareLinear

BF16 = torch.bfloat16
# bf16 keeps 8 significant bits: one rounding is 2^-9 relative; a few chained ops stay under 3 %
TOL = 0.03


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).norm() / ref.float().norm())


# -- MedCare: every mode, one layer -----------------------------------------------------------------
# (id, layer mode, config overrides, training mode)
MEDCARE_MODES = [
    ("mka", "mka", {}, True),
    ("mka-expert-dropout", "mka", {"expert_dropout": 0.1}, True),
    ("mka-eval-with-na", "mka", {"keep_na": True}, False),
    ("mka-eval-ka-only", "mka", {"keep_na": False}, False),
    ("da", "da", {}, True),
    ("da-eval", "da", {}, False),
    ("da-keep-na", "da_na", {}, True),
    ("da-keep-na-eval", "da_na", {"keep_na": True}, False),
]


def medcare_layer(mode: str, overrides: dict, train: bool) -> MedCareLinear:
    torch.manual_seed(0)
    cfg = MedCareConfig(r=4, alpha=8, s=2, n_experts=4, top_k=2, **overrides)
    m = MedCareLinear(nn.Linear(32, 24), cfg, mode)
    m.linear.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero B and a decisive router: the adapters matter in the output
        for name, p in m.adapter_parameters():
            if name.endswith("_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name.startswith("router."):
                p.copy_(torch.randn(p.shape, generator=g))
    return m.train(train)


def run_layer(m: nn.Module, x: torch.Tensor, autocast: bool):
    m.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    torch.manual_seed(5)  # the same dropout masks in the fp32 reference and the bf16 run
    with torch.autocast("cpu", BF16, enabled=autocast):
        y = m(x)
    g = torch.Generator().manual_seed(7)
    y.float().backward(torch.randn(y.shape, generator=g))
    return y.detach(), x.grad, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("base_dtype", [torch.float32, BF16], ids=["fp32-base", "bf16-base"])
@pytest.mark.parametrize("name, mode, overrides, train", MEDCARE_MODES, ids=[m[0] for m in MEDCARE_MODES])
def test_medcare_layer_under_bf16_autocast_matches_fp32(name, mode, overrides, train, base_dtype):
    ref_layer = medcare_layer(mode, overrides, train)
    layer = copy.deepcopy(ref_layer)
    layer.linear.to(base_dtype)
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(3)).to(base_dtype)

    y_ref, _, g_ref = run_layer(ref_layer, x.float(), autocast=False)
    y, x_grad, grads = run_layer(layer, x, autocast=True)

    assert y.dtype == BF16 and x_grad.dtype == base_dtype
    base_out = ref_layer.linear(x.float()).detach()
    assert rel_err(base_out, y_ref) > 10 * TOL  # the adapters' share is far above the tolerance
    assert rel_err(y, y_ref) < TOL, name
    assert set(grads) == set(g_ref) and grads  # the same weights get gradients (KA only: NA none)
    for pname, g in grads.items():
        p = dict(layer.named_parameters())[pname]
        assert g.dtype == p.dtype == torch.float32, pname  # fp32 adapters, fp32 grads
        if g_ref[pname].norm() > 0:
            assert rel_err(g, g_ref[pname]) < 2 * TOL, pname


# -- MedCare and C-Poly: the whole model, loss and gradients -------------------------------------------
def tiny_qwen2(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).to(dtype)


IDS = torch.tensor([[1, 5, 9, 33, 2, 71, 18, 40], [4, 4, 60, 99, 0, 12, 7, 3]])


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (name.endswith(("_B", "cpoly_B", "cpoly_logits")) or ".lora_B." in name):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def lm_loss(model, autocast: bool, **kw):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    with torch.autocast("cpu", BF16, enabled=autocast):
        out = model(input_ids=IDS, labels=IDS, **kw)
    out.loss.backward()
    return out.loss.detach().float(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def cast_base(model, dtype):
    """The frozen base in `dtype`, adapters as they are (how the loader gives a frozen base)."""
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    return model


def assert_model_matches(model_ref, model, **kw):
    loss_ref, g_ref = lm_loss(model_ref, autocast=False, **kw)
    loss, grads = lm_loss(model, autocast=True, **kw)
    assert abs(loss.item() - loss_ref.item()) < TOL * loss_ref.item()
    assert set(grads) == set(g_ref) and grads
    trainable = dict(model.named_parameters())
    for name, g in grads.items():
        assert g.dtype == trainable[name].dtype and torch.isfinite(g).all(), name
    # bf16 through attention two layers deep: single small gradients (a router's) are noisy, so
    # closeness is proven per layer above; here the whole update must point the same way
    flat = lambda gs: torch.cat([gs[n].float().flatten() for n in sorted(g_ref)])  # noqa: E731
    assert F.cosine_similarity(flat(grads), flat(g_ref), dim=0) > 0.97


MODEL_CASES = ["mka", "mka-expert-dropout", "da", "da-keep-na"]


def medcare_model(case: str, tmp_path):
    cfg = MedCareConfig(r=4, alpha=8, s=2, n_experts=4, top_k=2, expert_dropout=0.1 if "dropout" in case else 0.0)
    if case.startswith("mka"):
        model = mc.inject_mka(tiny_qwen2(), cfg)
    elif case == "da":
        model = mc.inject_da(tiny_qwen2(), cfg)
    else:
        mka = mc.inject_mka(tiny_qwen2(), cfg)
        randomize_adapters(mka, seed=2)
        medcare_io.save_medcare(mka, tmp_path / "mka")
        model = mc.inject_da(tiny_qwen2(), cfg, keep_na=tmp_path / "mka")
    randomize_adapters(model)
    return model.train()


@pytest.mark.parametrize("base_dtype", [torch.float32, BF16], ids=["fp32-base", "bf16-base"])
@pytest.mark.parametrize("case", MODEL_CASES)
def test_medcare_model_trains_under_bf16_autocast(case, base_dtype, tmp_path):
    ref = medcare_model(case, tmp_path)
    model = cast_base(copy.deepcopy(ref), base_dtype)
    if case == "da":
        assert mc.orthogonal_loss(model).dtype == torch.float32
    assert_model_matches(ref, model)


def test_medcare_inference_paths_in_bf16(tmp_path):
    """What a GPU serves: the merged model and the keep-NA model (base + adapters), bf16 base,
    no autocast (adapters fp32 beside it); and both under autocast."""
    cfg = MedCareConfig(r=4, alpha=8, s=2, n_experts=4, top_k=2, keep_na=True)
    mka = mc.inject_mka(tiny_qwen2(), cfg)
    randomize_adapters(mka, seed=2)
    medcare_io.save_medcare(mka, tmp_path / "mka")
    trained = mc.inject_da(tiny_qwen2(), cfg, keep_na=tmp_path / "mka")  # DA with NA kept
    randomize_adapters(trained)
    medcare_io.save_medcare(trained, tmp_path / "da")
    ref_na = medcare_io.load_medcare(tiny_qwen2(), tmp_path / "da").eval()
    ref_merged = medcare_io.merge_medcare(medcare_io.load_medcare(tiny_qwen2(), tmp_path / "da")).eval()
    with torch.no_grad():
        logits_na, logits_merged = ref_na(IDS).logits, ref_merged(IDS).logits
        for autocast in (False, True):
            served = medcare_io.load_medcare(tiny_qwen2(BF16), tmp_path / "da").eval()
            merged = medcare_io.merge_medcare(medcare_io.load_medcare(tiny_qwen2(BF16), tmp_path / "da")).eval()
            with torch.autocast("cpu", BF16, enabled=autocast):
                served_logits, merged_logits = served(IDS).logits.float(), merged(IDS).logits
            # routed: a token whose top-2 is a near-tie may pick another expert in bf16 (2 of 16
            # here); every other token is the fp32 result within tolerance
            per_token = (served_logits - logits_na).norm(dim=-1) / logits_na.norm(dim=-1)
            assert (per_token < TOL).sum() >= 13, per_token
            assert rel_err(merged_logits, logits_merged) < TOL
    assert rel_err(logits_na, logits_merged) > 3 * TOL  # NA (dropped by the merge) is in use


CPOLY_CASES = [("train", {}, True), ("eval", {}, False), ("straight-through", {"straight_through": True}, True),
               ("adapter-dtype-base", {"adapter_dtype": "base"}, True)]


@pytest.mark.parametrize("base_dtype", [torch.float32, BF16], ids=["fp32-base", "bf16-base"])
@pytest.mark.parametrize("case, overrides, train", CPOLY_CASES, ids=[c[0] for c in CPOLY_CASES])
def test_cpoly_model_under_bf16_autocast_matches_fp32(case, overrides, train, base_dtype):
    tasks = ["a", "b", "c"]
    cfg = CPolyConfig(r=4, target_modules=["all-linear"], dropout=0.1, **overrides)
    ref = inject_cpoly(tiny_qwen2(), tasks, cfg)
    randomize_adapters(ref)
    ref.train(train)
    if overrides.get("adapter_dtype") == "base":  # adapters in the base's dtype from the start
        model = inject_cpoly(tiny_qwen2(base_dtype), tasks, cfg)
        model.load_state_dict(ref.state_dict())
        model.train(train)
    else:
        model = cast_base(copy.deepcopy(ref), base_dtype)
    task_ids = torch.tensor([2, 0])
    assert_model_matches(ref, model, task_ids=task_ids)


# -- DeepSpeed's bf16 weights: routing and the orthogonal term stay fp32 ------------------------------
def test_medcare_routing_is_fp32_with_bf16_weights():
    layer = medcare_layer("da_na", {}, train=True).to(BF16)  # every tensor bf16, as DeepSpeed casts it
    x = torch.randn(20, 32, generator=torch.Generator().manual_seed(4)).to(BF16)
    gates = layer.route(x)
    assert gates.dtype == torch.float32
    logits = layer.router(x).float()  # the bf16 GEMM's output, then the routing math in fp32
    probs = logits.softmax(-1)
    w, idx = probs.topk(2, dim=-1)
    expected = torch.zeros_like(probs).scatter(1, idx, w / w.sum(-1, keepdim=True))
    assert torch.equal(gates, expected)
    assert torch.allclose(gates.sum(-1), torch.ones(20), atol=1e-6)  # bf16 gates would miss 1 by ~4e-3
    orth = layer.orth_term()
    assert orth.dtype == torch.float32
    assert orth.item() == (layer.ka_A.float() @ layer.align_A.float().t()).abs().sum().item()
    y = layer(x)
    assert y.dtype == BF16 and torch.isfinite(y).all()


def test_cpoly_gumbel_noise_is_fp32_with_bf16_weights():
    """bf16 uniform noise has 8 mantissa bits: a few hundred distinct samples. In fp32 nearly
    every one of 4096 samples is distinct."""
    torch.manual_seed(0)
    layer = CPolyLinear(nn.Linear(8, 8), 1, CPolyConfig(r=2, n_shared_skills=4), _TaskState()).to(BF16).train()
    w = layer.shared_weights(torch.zeros(1024, dtype=torch.long))
    assert w.dtype == torch.float32
    assert w.unique().numel() > 4000
    alloc = layer.allocation(torch.zeros(4, dtype=torch.long))
    assert alloc.dtype == torch.float32


# -- the dtype a training stage loads its input model in (item 7) -------------------------------------
def _params(kind: str, precision: str):
    from medpipe.stages.medcare_da import MedCareDAParams
    from medpipe.stages.medcare_mka import MedCareMKAParams
    from medpipe.stages.sft import SFTParams
    from medpipe.stages.training.params import LoraParams

    return {"sft-full": lambda: SFTParams(precision=precision),
            "sft-lora": lambda: SFTParams(precision=precision, peft=LoraParams()),
            "medcare_mka": lambda: MedCareMKAParams(precision=precision),
            "medcare_da": lambda: MedCareDAParams(precision=precision)}[kind]()


# (kind, precision, DeepSpeed's bf16/fp16 block: None = no DeepSpeed) -> dtype on a bf16 GPU
GPU_TABLE = [
    ("sft-full", "auto", None, torch.float32),  # no DeepSpeed: fp32 weights, autocast computes in bf16
    ("sft-full", "auto", "auto", BF16),  # DeepSpeed casts to bf16 and keeps its own fp32 master
    ("sft-full", "bf16", True, BF16),
    ("sft-full", "auto", False, torch.float32),  # a config that trains in fp32
    ("sft-full", "fp16", "auto", torch.float16),
    ("sft-full", "fp16", None, torch.float32),
    ("sft-full", "fp32", "auto", torch.float32),
    ("sft-lora", "auto", None, BF16),  # a frozen base
    ("sft-lora", "fp16", None, torch.float16),
    ("sft-lora", "fp32", None, torch.float32),
    ("medcare_mka", "auto", None, BF16),  # MedCare's base is frozen too (was fp32)
    ("medcare_mka", "auto", "auto", BF16),
    ("medcare_da", "bf16", None, BF16),
    ("medcare_da", "fp32", None, torch.float32),
]


def _load(tmp_path, kind, precision, ds_block, model_opts=None):
    import json
    from types import SimpleNamespace

    from medpipe.stages.models.tiny import ensure_tiny
    from medpipe.stages.training.loop import load_model

    ds = None
    if ds_block is not None:
        ds = tmp_path / "deepspeed.json"
        half = "fp16" if precision == "fp16" else "bf16"
        ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, half: {"enabled": ds_block}}))
    ctx = SimpleNamespace(model=model_opts or {}, input=SimpleNamespace(model_path=str(ensure_tiny())),
                          deepspeed_config=str(ds) if ds else None, seed=0)
    return load_model(ctx, _params(kind, precision)).dtype


@pytest.mark.parametrize("kind, precision, ds_block, want", GPU_TABLE)
def test_training_load_dtype_on_a_bf16_gpu(tmp_path, monkeypatch, kind, precision, ds_block, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: None)  # load_model's per-stage peak
    assert _load(tmp_path, kind, precision, ds_block) == want
    # model.dtype, when set, is what loads
    assert _load(tmp_path, kind, precision, ds_block, {"dtype": "float32"}) == torch.float32


@pytest.mark.parametrize("kind", ["sft-full", "sft-lora", "medcare_mka", "medcare_da"])
def test_training_load_dtype_on_cpu_stays_fp32(tmp_path, kind):
    """No GPU: fp32 whatever the stage says (the CPU digests depend on it)."""
    assert not torch.cuda.is_available()
    for precision, ds_block in (("auto", None), ("bf16", True), ("auto", "auto")):
        assert _load(tmp_path, kind, precision, ds_block) == torch.float32
