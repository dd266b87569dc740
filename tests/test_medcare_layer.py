"""MedCare adapter layer (stages/adapters/medcare.py): equivalence, routing, orth loss, merge, I/O."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM  # at collection: the lazy import costs ~2 s

from medpipe.stages.adapters import medcare as mc
from medpipe.stages.adapters import medcare_io
from medpipe.stages.adapters.medcare import MedCareConfig, MedCareLinear


# -- helpers -------------------------------------------------------------------------------
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matrices gain nothing from threads, and OpenMP barriers stall (~10 ms per op) when
    # another process holds a core of this 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_qwen2(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    return Qwen2ForCausalLM(cfg).to(dtype).eval()


SMALL = MedCareConfig(r=4, alpha=8, s=2, n_experts=4, top_k=2)
IDS = torch.tensor([[1, 5, 9, 33, 2, 71, 18], [4, 4, 60, 99, 0, 12, 7]])


def randomize_B(model, seed=1):
    """Nonzero B everywhere (adapters start at zero, which would make every comparison trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ka_B", "na_B", "align_B")) or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
            elif name.endswith(("router.weight", "router.bias")):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def layer(mode="mka", cfg=SMALL, d_in=6, d_out=5, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    m = MedCareLinear(nn.Linear(d_in, d_out, dtype=dtype), cfg, mode)
    m.linear.requires_grad_(False)
    randomize_B(m, seed)
    return m.train()


def naive_forward(m: MedCareLinear, x: torch.Tensor) -> torch.Tensor:
    """Reference: every expert computed for every token ([E, T, d_out]), masked by the gate."""
    c, x2 = m.cfg, x.reshape(-1, x.shape[-1])
    xd = F.dropout(x2, c.expert_dropout, training=m.training)  # on KA and experts, not the router
    probs = torch.softmax(F.linear(x2, m.router.weight, m.router.bias), dim=-1)
    mask = torch.zeros_like(probs).scatter(1, probs.topk(c.top_k, dim=-1).indices, 1.0)
    w = probs * mask
    if c.renormalized:
        w = w / w.sum(dim=-1, keepdim=True)
    lora = lambda A, B: (xd @ A.t()) @ B.t() * m.scale
    stack = torch.stack([lora(m.na_A[e * c.r:(e + 1) * c.r], m.na_B[:, e * c.r:(e + 1) * c.r])
                         for e in range(c.n_experts)])
    out = m.linear(x2) + lora(m.ka_A, m.ka_B) + (w.t().unsqueeze(-1) * stack).sum(0)
    return out.view(*x.shape[:-1], -1)


def grads_of(m, x, fn):
    x = x.clone().requires_grad_(True)
    m.zero_grad(set_to_none=True)
    y = fn(x)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape))
    return y.detach(), x.grad, {n: p.grad for n, p in m.named_parameters() if p.requires_grad}


# -- layer ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["mka", "da"])
def test_fresh_layer_equals_base_exactly(mode):
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    m = MedCareLinear(base, SMALL, mode).train()  # B's are zero at init
    x = torch.randn(3, 4, 6)
    assert torch.equal(m(x), base(x))


def test_da_without_na_zero_B_equals_base_exactly():
    m = layer("da", dtype=torch.float32)
    assert not hasattr(m, "na_A") and not hasattr(m, "router")
    with torch.no_grad():
        m.ka_B.zero_(), m.align_B.zero_()
    x = torch.randn(2, 7, 6)
    assert torch.equal(m(x), m.linear(x))


def test_half_precision_base_gets_fp32_adapters():
    m = layer("mka", dtype=torch.bfloat16)
    assert m.ka_A.dtype == torch.float32 and m.linear.weight.dtype == torch.bfloat16
    x = torch.randn(2, 3, 6, dtype=torch.bfloat16)
    y = m(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 5)
    y.float().sum().backward()
    assert m.na_A.grad.dtype == torch.float32


def test_config_rejects_impossible_settings_naming_each_field():
    with pytest.raises(ValueError, match=r"r must be >= 1, got 0; .*top_k must be between 1 and n_experts \(4\)"):
        MedCareConfig(r=0, n_experts=4, top_k=5)
    with pytest.raises(ValueError, match="align_dropout must be in"):
        MedCareConfig(align_dropout=1.0)


def test_init_scale_and_shapes():
    m = MedCareLinear(nn.Linear(64, 40), MedCareConfig(), "mka")
    assert m.scale == 2.0 and m.ka_A.shape == (32, 64) and m.na_A.shape == (128, 64)
    assert m.na_B.shape == (40, 128) and m.router.weight.shape == (8, 64) and m.router.bias is not None
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=√5) on fan_in = d_in
    for A in (m.ka_A, m.na_A):
        assert A.abs().max() <= bound and A.abs().max() > 0.8 * bound
    assert not m.ka_B.any() and not m.na_B.any()


@pytest.mark.parametrize("renorm", [True, False])
def test_router_hand_computation(renorm):
    cfg = MedCareConfig(r=1, alpha=1, s=1, n_experts=4, top_k=2, renormalize=renorm)
    m = MedCareLinear(nn.Linear(2, 3, dtype=torch.float64), cfg, "mka")
    with torch.no_grad():
        m.router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.5]]))
        m.router.bias.copy_(torch.tensor([0.0, 0.1, -0.5, 0.2]))
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.0], [0.3, -0.4]], dtype=torch.float64)
    gates = m.route(x)
    for t in range(3):
        logits = [sum(w * v for w, v in zip(row, x[t].tolist())) + b
                  for row, b in zip(m.router.weight.tolist(), m.router.bias.tolist())]
        z = sum(math.exp(l) for l in logits)
        p = [math.exp(l) / z for l in logits]
        top = sorted(range(4), key=lambda e: -p[e])[:2]
        denom = p[top[0]] + p[top[1]] if renorm else 1.0
        want = [p[e] / denom if e in top else 0.0 for e in range(4)]
        assert (gates[t] != 0).sum() == 2
        assert gates[t].tolist() == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("renorm,dropout", [(True, 0.0), (False, 0.0), (True, 0.3)])
def test_efficient_equals_naive_outputs_and_grads(renorm, dropout):
    # dropout 0: the router shares the experts' GEMM; dropout > 0: it reads the undropped input.
    cfg = MedCareConfig(r=3, alpha=6, s=2, n_experts=5, top_k=2, renormalize=renorm, expert_dropout=dropout)
    m = layer("mka", cfg, d_in=7, d_out=6)
    x = torch.randn(3, 4, 7, dtype=torch.float64)
    torch.manual_seed(5)  # the same dropout mask in both (one draw, same shape)
    y1, gx1, gp1 = grads_of(m, x, m)
    torch.manual_seed(5)
    y2, gx2, gp2 = grads_of(m, x, lambda x: naive_forward(m, x))
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=0)
    torch.testing.assert_close(gx1, gx2, atol=1e-5, rtol=0)
    assert set(gp1) == {"ka_A", "ka_B", "na_A", "na_B", "router.weight", "router.bias"}
    for n in gp1:
        assert gp1[n] is not None and gp1[n].abs().sum() > 0, n
        torch.testing.assert_close(gp1[n], gp2[n], atol=1e-5, rtol=0, msg=n)


# -- variant paper: Eq. 4/5 (MKA), Eq. 9/13 (DA), Gaussian A -------------------------------------
PAPER = MedCareConfig(variant="paper", r=2, alpha=8, s=2, n_experts=4, top_k=2)


def test_variant_paper_mka_equals_eq4_eq5_by_hand():
    m = layer("mka", PAPER, d_in=3, d_out=2).eval()
    x = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]], dtype=torch.float64)
    got = m(x)
    r, rk, alpha = 2, 4, 8.0  # NA rank r; KA rank r' = s·r
    for t in range(2):
        xt = x[t]
        logits = (m.router.weight @ xt + m.router.bias).detach()
        g = torch.exp(logits) / torch.exp(logits).sum()  # Eq. 4: G(x) = softmax(x W_r)
        top = sorted(range(4), key=lambda e: -float(g[e]))[:2]
        h = m.linear.weight @ xt + m.linear.bias
        h = h + alpha / rk * (m.ka_B @ (m.ka_A @ xt))  # KA = LoRA of rank r' (Eq. 1 with r')
        for e in top:  # Eq. 5: (α/r) Σ_{i∈topK} w_i · B_i A_i x, w_i = G(x)_i (not renormalised)
            h = h + alpha / r * g[e] * (m.na_B[:, e * r:(e + 1) * r] @ (m.na_A[e * r:(e + 1) * r] @ xt))
        torch.testing.assert_close(got[t], h, atol=1e-12, rtol=0)
    code = MedCareLinear(m.linear, MedCareConfig(r=2, alpha=8, s=2, n_experts=4, top_k=2), "mka").eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if not n.startswith("linear."):
                code.get_parameter(n).copy_(p)
    assert (code(x) - got).abs().max() > 1e-3  # the code variant (α/r, renormalised) differs


def test_variant_paper_da_and_merge_equal_eq9_eq13_by_hand():
    m = layer("da", PAPER, d_in=3, d_out=2).eval()
    with torch.no_grad():
        m.ka_B.copy_(torch.randn(m.ka_B.shape, dtype=torch.float64))
    x = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]], dtype=torch.float64)
    rk, ra, alpha = 4, 4, 8.0  # KA rank r' = s·r; Align rank s·r by default
    W = m.linear.weight.clone()
    eq13 = W + alpha / rk * (m.ka_B @ m.ka_A) + alpha / ra * (m.align_B @ m.align_A)
    torch.testing.assert_close(m(x), x @ eq13.t() + m.linear.bias, atol=1e-12, rtol=0)  # Eq. 9
    torch.testing.assert_close(W + m.delta_weight(), eq13, atol=1e-12, rtol=0)  # Eq. 13, the export


def test_variant_paper_inits_a_gaussian_and_code_a_kaiming_uniform():
    torch.manual_seed(0)
    d_in = 4096
    paper = MedCareLinear(nn.Linear(d_in, 8), MedCareConfig(variant="paper"), "mka")
    code = MedCareLinear(nn.Linear(d_in, 8), MedCareConfig(), "mka")
    # Gaussian, std 1/rank of each LoRA (PEFT's `gaussian`): KA rank 32, each NA expert rank 16
    assert abs(paper.ka_A.std().item() - 1 / 32) < 1e-3 and abs(paper.na_A.std().item() - 1 / 16) < 1e-3
    assert paper.ka_A.abs().max() > 1 / math.sqrt(d_in)  # unbounded tails, unlike Kaiming-uniform
    assert code.ka_A.abs().max() <= 1 / math.sqrt(d_in)
    assert not paper.ka_B.any() and not paper.na_B.any()  # B zero: a fresh layer equals the base


def test_da_applies_one_dropout_to_ka_and_align_input():
    # the authors' DA: x = lora_dropout(x) once, then KA and Align (medpipe's own code had KA undropped)
    cfg = MedCareConfig(r=2, alpha=4, s=2, align_dropout=0.5)
    m = layer("da", cfg, d_in=8, d_out=3)
    with torch.no_grad():
        m.ka_B.copy_(torch.randn(m.ka_B.shape, dtype=torch.float64))
    x = torch.randn(6, 8, dtype=torch.float64)
    torch.manual_seed(3)
    got = m(x)
    torch.manual_seed(3)
    xd = F.dropout(x, 0.5, training=True)
    want = m.linear(x) + ((xd @ m.ka_A.t()) @ m.ka_B.t() + (xd @ m.align_A.t()) @ m.align_B.t()) * m.scale
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_da_with_na_kept_starts_as_mka_trains_na_and_round_trips(tmp_path):
    """Table 3's "DA with NA kept": the DA layers carry MKA's KA, NA experts and routers (mode
    da_na) + a fresh Align: at the start the model computes exactly what MKA did; NA trains on;
    the saved adapter reloads; the merged export folds KA + Align and drops NA."""
    cfg = MedCareConfig(r=2, alpha=4, s=2, n_experts=4, top_k=2, attn_lora=False)
    mka = mc.inject_mka(tiny_qwen2(), cfg)
    randomize_B(mka)
    medcare_io.save_medcare(mka, tmp_path / "mka")
    with torch.no_grad():
        want = mka.eval()(input_ids=IDS).logits
    da = mc.inject_da(tiny_qwen2(), cfg, keep_na=tmp_path / "mka").eval()
    layers = [m for _, m in mc.medcare_modules(da)]
    assert layers and all(m.mode == "da_na" and m.has_na and m.has_align for m in layers)
    with torch.no_grad():
        torch.testing.assert_close(da(input_ids=IDS).logits, want, atol=1e-6, rtol=0)  # Align B = 0
    trainable = {n.rsplit(".", 1)[-1] for n, p in da.named_parameters() if p.requires_grad}
    assert {"na_A", "na_B", "ka_A", "ka_B", "align_A", "align_B", "weight", "bias"} == trainable  # router weight/bias
    with torch.no_grad():
        for m in layers:
            m.align_B.normal_()
        trained = da(input_ids=IDS).logits
    medcare_io.save_medcare(da, tmp_path / "da")
    again = medcare_io.load_medcare(tiny_qwen2(), tmp_path / "da").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=IDS).logits, trained, atol=1e-6, rtol=0)
        for m in [m for _, m in mc.medcare_modules(again)]:
            m.cfg.keep_na = False  # what the plain export computes: KA + Align, no NA
        without_na = again(input_ids=IDS).logits
        merged = medcare_io.merge_medcare(da)(input_ids=IDS).logits
    torch.testing.assert_close(merged, without_na, atol=1e-5, rtol=0)
    assert (merged - trained).abs().max() > 1e-4  # NA mattered, and the export dropped it


def test_keep_na_false_uses_ka_only_at_inference():
    m = layer("mka", MedCareConfig(r=2, alpha=4, n_experts=3, top_k=1, keep_na=False)).eval()
    x = torch.randn(5, 6, dtype=torch.float64)
    want = m.linear(x) + (x @ m.ka_A.t()) @ m.ka_B.t() * m.scale
    torch.testing.assert_close(m(x), want)
    m.train()
    assert not torch.allclose(m(x), want)  # NA is used in training


def test_balance_loss_switch_style():
    cfg = MedCareConfig(r=2, alpha=4, n_experts=3, top_k=1, balance_coef=0.5)
    m = layer("mka", cfg)
    x = torch.randn(8, 6, dtype=torch.float64)
    m(x)
    loss = mc.balance_loss(m)
    probs = torch.softmax(m.router(x), -1)
    f = torch.bincount(probs.argmax(-1), minlength=3).double() / 8
    torch.testing.assert_close(loss, 0.5 * 3 * (f * probs.mean(0)).sum())
    loss.backward()
    assert m.router.weight.grad.abs().sum() > 0
    assert mc.balance_loss(m) is None  # consumed
    off = layer("mka")
    off(x)
    assert mc.balance_loss(off) is None  # coefficient 0 by default


def test_balance_loss_ignores_padding():
    cfg = MedCareConfig(r=2, alpha=4, n_experts=3, top_k=1, balance_coef=1.0)
    m = layer("mka", cfg)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # left padding in the second row
    mc.set_token_mask(m, mask)
    m(x)
    loss = mc.balance_loss(m)
    real = x.reshape(-1, 6)[mask.reshape(-1).bool()]
    probs = torch.softmax(m.router(real), -1)
    f = torch.bincount(probs.argmax(-1), minlength=3).double() / len(real)
    torch.testing.assert_close(loss, 3 * (f * probs.mean(0)).sum())
    mc.set_token_mask(m, None)
    m(x)  # no mask: every token counts
    all_probs = torch.softmax(m.router(x.reshape(-1, 6)), -1)
    f_all = torch.bincount(all_probs.argmax(-1), minlength=3).double() / 10
    torch.testing.assert_close(mc.balance_loss(m), 3 * (f_all * all_probs.mean(0)).sum())


# -- orthogonal loss -------------------------------------------------------------------------
def test_orthogonal_loss_hand_computation_and_grad_targets():
    cfg = MedCareConfig(r=1, alpha=2, s=2, align_rank=2)
    m = layer("da", cfg, d_in=3, d_out=4)
    ka = [[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]
    al = [[2.0, 1.0, -1.0], [-0.5, 0.0, 4.0]]
    with torch.no_grad():
        m.ka_A.copy_(torch.tensor(ka)), m.align_A.copy_(torch.tensor(al))
    want = sum(abs(sum(a * b for a, b in zip(ka[i], al[j]))) for i in range(2) for j in range(2))
    loss = mc.orthogonal_loss(m)
    assert loss.item() == pytest.approx(want)  # |−1.5|+|1.5|+|0|+|−4| = 7
    loss.backward()
    assert m.ka_A.grad.abs().sum() > 0 and m.align_A.grad.abs().sum() > 0
    assert m.ka_B.grad is None and m.align_B.grad is None and m.linear.weight.grad is None


def test_orthogonal_loss_model_uses_forward_terms():
    model = mc.inject_da(tiny_qwen2(), SMALL)
    randomize_B(model)
    direct = sum((m.ka_A @ m.align_A.t()).abs().sum() for _, m in mc.medcare_modules(model))
    model.train()
    model(input_ids=IDS)
    mods = [m for _, m in mc.medcare_modules(model)]
    assert len(mods) == 6 and all(m._orth is not None for m in mods)  # computed inside forward
    loss = mc.orthogonal_loss(model)
    assert all(m._orth is None for m in mods)
    torch.testing.assert_close(loss, direct)
    loss.backward()
    for name, p in model.named_parameters():
        has = p.grad is not None and p.grad.abs().sum() > 0
        assert has == name.endswith(("ka_A", "align_A")), name


@pytest.mark.parametrize("reentrant", [False, True])
def test_orthogonal_loss_with_gradient_checkpointing(reentrant):
    """Reentrant checkpointing runs forward under no_grad: orthogonal_loss then reads the params."""
    def grads(gc):
        model = mc.inject_da(tiny_qwen2(), MedCareConfig(r=4, alpha=8, align_dropout=0.0))
        randomize_B(model)
        model.train()
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        (model(input_ids=IDS, labels=IDS).loss + mc.orthogonal_loss(model)).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    ref, got = grads(False), grads(True)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], msg=n)


def test_da_trainable_sets():
    model = mc.inject_da(tiny_qwen2(), SMALL)
    names = {n.rpartition(".")[2] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"ka_A", "ka_B", "align_A", "align_B"}
    frozen = mc.inject_da(tiny_qwen2(), MedCareConfig(r=4, alpha=8, train_ka=False))
    names = {n.rpartition(".")[2] for n, p in frozen.named_parameters() if p.requires_grad}
    assert names == {"align_A", "align_B"}


# -- model level -----------------------------------------------------------------------------
def test_mka_injection_fresh_equals_base_and_trainables():
    base = tiny_qwen2()
    ref = base(input_ids=IDS).logits
    model = mc.inject_mka(base, SMALL)
    assert torch.equal(model(input_ids=IDS).logits, ref)
    train = {n.split(".")[-1] if "lora_" not in n else "lora" for n, p in model.named_parameters() if p.requires_grad}
    assert train == {"ka_A", "ka_B", "na_A", "na_B", "weight", "bias", "lora"}  # router weight/bias
    lora_mods = {n.split(".")[-4] for n, p in model.named_parameters() if ".lora_A." in n}
    assert lora_mods == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert len(list(mc.medcare_modules(model))) == 6


def test_llama_table():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    model = mc.inject_mka(model, SMALL)
    assert sorted(n.rpartition(".")[2] for n, _ in mc.medcare_modules(model)) == ["down_proj", "gate_proj", "up_proj"]
    model(input_ids=IDS).logits.sum().backward()


def test_mka_to_da_merge_equals_unmerged(tmp_path):
    from transformers import AutoModelForCausalLM

    model = mc.inject_mka(tiny_qwen2(), SMALL)
    randomize_B(model)
    medcare_io.save_ka(model, tmp_path / "ka")
    ka_ref = {n: m.ka_B.detach().clone() for n, m in mc.medcare_modules(model)}
    handed = medcare_io.merge_medcare(model, fold_ka=False)  # MKA hand-off: attention merged, NA/KA dropped
    assert not list(mc.medcare_modules(handed)) and "lora" not in str(handed)

    da = mc.inject_da(handed, SMALL, ka=tmp_path / "ka")
    for n, m in mc.medcare_modules(da):
        assert torch.equal(m.ka_B, ka_ref[n])
    randomize_B(da, seed=3)  # a trained Align (and KA moved on)
    da.eval()
    unmerged = da(input_ids=IDS).logits
    merged = medcare_io.merge_medcare(da)
    assert type(merged.model.layers[0].mlp.up_proj) is nn.Linear
    torch.testing.assert_close(merged(input_ids=IDS).logits, unmerged, atol=1e-5, rtol=0)
    merged.save_pretrained(tmp_path / "final")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    torch.testing.assert_close(reloaded(input_ids=IDS).logits, unmerged, atol=1e-5, rtol=0)


def test_save_load_roundtrip(tmp_path):
    model = mc.inject_mka(tiny_qwen2(), SMALL)
    randomize_B(model)
    model.eval()
    ref = model(input_ids=IDS).logits
    medcare_io.save_medcare(model, tmp_path / "mka")
    loaded = medcare_io.load_medcare(tiny_qwen2(), tmp_path / "mka").eval()
    torch.testing.assert_close(loaded(input_ids=IDS).logits, ref, atol=0, rtol=0)
    keys = mc.adapter_state_dict(loaded)
    assert any(k.endswith("router.weight") for k in keys) and any(".lora_A." in k for k in keys)

    da = mc.inject_da(tiny_qwen2(), SMALL)
    randomize_B(da)
    da.eval()
    ref = da(input_ids=IDS).logits
    medcare_io.save_medcare(da, tmp_path / "da")
    loaded = medcare_io.load_medcare(tiny_qwen2(), tmp_path / "da").eval()
    torch.testing.assert_close(loaded(input_ids=IDS).logits, ref, atol=0, rtol=0)


def test_ka_only_save_load(tmp_path):
    model = mc.inject_mka(tiny_qwen2(), SMALL)
    randomize_B(model)
    medcare_io.save_ka(model, tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / mc.KA_FILE)))
    assert len(keys) == 12 and all(k.endswith(("ka_A", "ka_B")) for k in keys)
    da = mc.inject_da(tiny_qwen2(), SMALL, ka=tmp_path)
    src = dict(mc.medcare_modules(model))
    for n, m in mc.medcare_modules(da):
        assert torch.equal(m.ka_A, src[n].ka_A) and torch.equal(m.ka_B, src[n].ka_B)
    with pytest.raises(ValueError, match="rank"):
        mc.inject_da(tiny_qwen2(), MedCareConfig(r=8, alpha=16), ka=tmp_path)


ZERO2_SCRIPT = r"""
import os, socket, sys, torch
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
sys.path.insert(0, sys.argv[1])
import deepspeed
import test_medcare_layer as T
from medpipe.stages.adapters import medcare as mc
deepspeed.init_distributed(dist_backend="gloo")
model = mc.inject_da(T.tiny_qwen2(), T.SMALL)
T.randomize_B(model)
ref = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2},
       "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0, "torch_adam": True}}}
params = [p for p in model.parameters() if p.requires_grad]
eng = deepspeed.initialize(model=model, model_parameters=params, config=cfg)[0]
eng.train()
eng(input_ids=T.IDS)
orth = mc.orthogonal_loss(eng)
assert orth.requires_grad and orth.item() > 0
eng.backward(orth)
eng.step()
moved = {n.rpartition(".")[2] for n, p in eng.module.named_parameters() if n in ref and not torch.equal(p, ref[n])}
assert moved == {"ka_A", "align_A"}, moved
print("ZERO2_OK")
"""


@pytest.mark.slow
def test_orthogonal_loss_under_deepspeed_zero2():
    """One ZeRO-2 step on the orth loss alone moves exactly the A matrices of KA and Align."""
    import os
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", ZERO2_SCRIPT, here], capture_output=True, text=True, timeout=300)
    assert "ZERO2_OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]
