"""MedCare adapter layer: MKA (KA + routed NA experts) and DA (KA + Align) on the FFN linears.

One layer with two modes (MKA, DA) sharing the KA weights, the routed product, and the
inject / merge / keep-NA code, on one weight layout.

Training-only module: it imports torch at top level, so only training code may import it
(see docs/CONTRACTS.md, "Heavy imports").

Per FFN linear (gate/up/down), as the MedCare paper describes it:

    MKA:  y = x Wᵀ + KA(x) + NA(x)
          KA(x) = (α/r) · B_ka A_ka x                    one LoRA of rank s·r, never routed, weight 1
          NA(x) = (α/r) · Σ_{e ∈ topK(x)} g_e(x) B_e A_e x  E LoRA experts of rank r
          g(x)  = softmax(router(x)) restricted to the top-K (renormalised to sum 1 by default)
    DA:   y = x Wᵀ + KA(x) + Align(x),  L_orth = Σ_layers Σ |A_ka A_alignᵀ|

Two variants (`MedCareConfig.variant`), where the paper and the authors' code differ:
* `code` (default, the published implementation): every LoRA scaled by α/r with the per-expert r
  (KA and Align included), the top-K gates renormalised to sum 1, every A Kaiming-uniform(a=√5).
* `paper`: Eq. 5 — NA experts at α/r with the plain softmax weights of the top-K (no
  renormalisation); Eq. 13 — KA and Align at α/r′ (r′ their rank, s·r by default); A Gaussian (§2).
Every B is zero in both, so a freshly injected model equals the base model. In DA one dropout
(`align_dropout`) is applied to the input of KA and Align, as the authors' code does.

Weight layout: all A and B are stored in nn.Linear weight layout, A: [rank, d_in], B: [d_out, rank].
The NA experts are stored concatenated: rows e·r … (e+1)·r−1 of `na_A` (and the same columns of
`na_B`) are expert e.

Efficient routed computation (measured in bench/bench_medcare_layer.py, see BENCHMARKS.md): KA and
all E experts are one low-rank product of rank (s+E)·r. x A_catᵀ gives [T, (s+E)·r]; each rank
block of an expert is multiplied by its gate weight (0 for the experts a token did not select, 1
for KA); one addmm with B_cat adds it to x Wᵀ. No loop over experts and no [E, T, d_out] stack.

Precision (what a GPU run does; tests/test_gpu_precision.py proves what CPU can express):
* Adapters are fp32 beside a half-precision base (`_adapter_dtype`, as PEFT's autocast_adapter_dtype).
* Under autocast (the Trainer's bf16 on the local launcher or DDP) every adapter GEMM runs in the
  autocast dtype: x is not copied to fp32 first, and the in-place addmm_ (in-place ops are not
  autocast) gets B cast to the activations' dtype, so its gradient comes back in fp32.
* Under DeepSpeed bf16 the engine casts the whole module, adapters included, to bf16 and keeps
  fp32 masters in its optimizer: the adapters then compute in bf16 without autocast.
* Whatever the weights' dtype, the routing math is fp32: router bias, softmax, top-K, gate
  renormalisation and the balance term (`_gates`); so is DA's orthogonal term (`orth_term`). The
  router's GEMM itself rides in the fused A-side GEMM in the compute dtype (bf16 tensor cores
  accumulate in fp32; the logits are rounded to bf16 once): a separate fp32 router GEMM would need
  an fp32 copy of x per FFN linear — by estimate (bytes moved at H100 bandwidth vs the rank-168
  GEMM's flops) ~3x the time of all that linear's adapter GEMMs at Qwen-7B sizes — for a top-K
  choice that differs only where two experts' logits are within a bf16 step of each other
  (Megatron-Core's default router dtype is the compute dtype too).

Attention projections get PEFT's LoRA: `inject_mka` wraps the FFN linears first, then calls
`peft.get_peft_model` with target_modules = attention names only, then turns requires_grad back on
for the FFN adapter parameters (PEFT freezes everything that is not its own). The wrapper keeps the
original linear under the attribute `linear` (not `base_layer`), because PEFT's merge/unload treats
any module with a `base_layer` attribute as one of its own tuner layers.

Save/load of whole adapters, the merge (Eq. 13) and the stage hand-off: medcare_io.py. This module
(~450 lines) is the layer, its fused MKA/DA forwards, injection and the aux losses, one unit.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from medpipe.stages.adapters.settings import MedCareConfig

# FFN and attention linears per `model.config.model_type`.
FFN_NAMES: dict[str, tuple[str, ...]] = {
    "qwen2": ("gate_proj", "up_proj", "down_proj"),  # Qwen1.5 / Qwen2 / Qwen2.5
    "qwen3": ("gate_proj", "up_proj", "down_proj"),
    "llama": ("gate_proj", "up_proj", "down_proj"),
    "mistral": ("gate_proj", "up_proj", "down_proj"),
    "gemma": ("gate_proj", "up_proj", "down_proj"),
    "gemma2": ("gate_proj", "up_proj", "down_proj"),
}
ATTN_NAMES: dict[str, tuple[str, ...]] = {
    k: ("q_proj", "k_proj", "v_proj", "o_proj") for k in FFN_NAMES
}

FORMAT = "medpipe-medcare/1"
MODES = ("mka", "da", "da_na")
ADAPTER_FILE, CONFIG_FILE = "medcare_adapter.safetensors", "medcare_config.json"
KA_FILE, KA_CONFIG_FILE = "medcare_ka.safetensors", "medcare_ka.json"
KA_PARAMS = ("ka_A", "ka_B")


def _init_A(rank: int, d_in: int, variant: str, block: int | None = None, **kw) -> nn.Parameter:
    """A LoRA A of `rank` rows (`block` rows per expert when several are stacked). variant code:
    Kaiming-uniform(a=√5) as PEFT's default (fan_in = d_in, same bound per expert block); variant
    paper: Gaussian ("A uses Gaussian initialization", §2), with PEFT's `gaussian` std 1/rank of
    each LoRA (the paper gives no std)."""
    a = torch.empty(rank, d_in, **kw)
    if variant == "paper":
        nn.init.normal_(a, std=1.0 / (block or rank))
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return nn.Parameter(a)


def _zero_B(d_out: int, rank: int, **kw) -> nn.Parameter:
    return nn.Parameter(torch.zeros(d_out, rank, **kw))


def _fp32_up(t: torch.Tensor) -> torch.Tensor:
    """t in fp32, or as it is when already fp32 or wider (the fp64 tests)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    # Like PEFT's autocast_adapter_dtype: half-precision bases get float32 adapters.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class MedCareLinear(nn.Module):
    """One FFN linear with its MedCare adapters. mode "mka": KA + NA + router; "da": KA + Align;
    "da_na": KA + NA + router + Align (Table 3's ablation "DA with NA kept")."""

    def __init__(self, linear: nn.Linear, cfg: MedCareConfig, mode: str = "mka"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.linear, self.cfg, self.mode = linear, cfg, mode
        self.has_na, self.has_align = mode in ("mka", "da_na"), mode in ("da", "da_na")
        self.scale = cfg.scale
        d_in, d_out = linear.in_features, linear.out_features
        kw = dict(device=linear.weight.device, dtype=_adapter_dtype(linear.weight.dtype))
        v = cfg.variant
        self.ka_A, self.ka_B = _init_A(cfg.ka_rank, d_in, v, **kw), _zero_B(d_out, cfg.ka_rank, **kw)
        self.expert_dropout = nn.Dropout(cfg.expert_dropout)
        if self.has_na:
            er = cfg.n_experts * cfg.r
            self.na_A, self.na_B = _init_A(er, d_in, v, block=cfg.r, **kw), _zero_B(d_out, er, **kw)
            self.router = nn.Linear(d_in, cfg.n_experts, bias=True, **kw)  # default init
        if self.has_align:
            ra = cfg.align_r
            self.align_A, self.align_B = _init_A(ra, d_in, v, **kw), _zero_B(d_out, ra, **kw)
            self.align_dropout = nn.Dropout(cfg.align_dropout)
        # Aux-loss terms of the latest grad-enabled forward, read (and cleared) by
        # orthogonal_loss / balance_loss so the terms come from the live parameters.
        self._orth: torch.Tensor | None = None
        self._balance: torch.Tensor | None = None
        self._token_mask: torch.Tensor | None = None  # real tokens of the forward (set_token_mask)

    def extra_repr(self) -> str:
        c = self.cfg
        na = f", E={c.n_experts}, K={c.top_k}, r={c.r}" if self.has_na else ""
        align = f", align_r={c.align_r}" if self.has_align else ""
        return f"mode={self.mode}, ka_rank={c.ka_rank}{na}{align}, scale={self.scale:g}"

    def adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(local name, parameter) of every adapter parameter (not the wrapped linear)."""
        for name, p in self.named_parameters():
            if not name.startswith("linear."):
                yield name, p

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = x.reshape(-1, x.shape[-1])
        # 2-D in, so y is a fresh tensor, not a view: an in-place op on a view would make autograd
        # copy and zero-fill the whole [T, d_out] gradient (CopySlices) in backward.
        y = self.linear(x1)
        # Under autocast every adapter GEMM runs in the autocast dtype anyway: no fp32 copy of x.
        xa = x1 if torch.is_autocast_enabled(x1.device.type) else x1.to(self.ka_A.dtype)
        h, B = self._mka_lowrank(xa) if self.mode == "mka" else self._da_lowrank(xa)
        if y.dtype == h.dtype:
            # y += h Bᵀ inside the GEMM, in place: no extra pass or copy of [T, d_out]. Safe
            # because nn.Linear's backward keeps its input and weight, never its output. In-place
            # ops are not autocast: B (fp32 adapters under a bf16 autocast) is cast here (cheap:
            # [d_out, rank]); the cast is in the graph, so B's gradient comes back in fp32.
            y = y.addmm_(h, B.t().to(h.dtype))
        else:
            y = y + F.linear(h, B).to(y.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Gate weights [T, E]: softmax over all E, top-K kept (optionally renormalised), rest 0."""
        return self._gates(self.router(x))

    def _gates(self, logits: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Routing math in fp32 (or wider) whatever the compute dtype (the precision policy in the
        module docstring): bias, softmax, top-K, renormalisation and the balance term. Gates [T, E]
        come back in fp32; the caller casts them to its low-rank activations' dtype."""
        logits = _fp32_up(logits)
        if bias is not None:
            logits = logits + _fp32_up(bias)
        probs = logits.softmax(dim=-1)
        w, idx = probs.topk(self.cfg.top_k, dim=-1)
        if self.cfg.renormalized:  # variant code; the paper's Eq. 4/5 use the softmax weights as they are
            w = w / w.sum(dim=-1, keepdim=True)
        self._balance = self._balance_term(probs, idx) if self._wants_aux() and self.cfg.balance_coef > 0 else None
        return torch.zeros_like(probs).scatter(1, idx, w)

    def _balance_term(self, probs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        # Switch Transformer: E · Σ_e f_e P_e; f_e = share of the T·K routing slots sent to e
        # (no gradient), P_e = mean router probability of e. Equals 1 for uniform routing.
        # Counted with scatter_add and a 0/1 token weight, not bincount / boolean indexing: those
        # size their output from the data, a host sync per layer per forward on a GPU.
        E, K = probs.shape[-1], idx.shape[-1]
        keep = self._token_mask
        if keep is not None and keep.numel() == probs.shape[0]:  # padding does not count
            real = keep.to(probs.dtype)
            n = real.sum()
            slots = torch.zeros(E, dtype=probs.dtype, device=probs.device).scatter_add_(
                0, idx.flatten(), real.repeat_interleave(K))
            return E * ((slots / (n * K)) * ((probs * real[:, None]).sum(dim=0) / n)).sum()
        slots = torch.zeros(E, dtype=probs.dtype, device=probs.device).scatter_add_(
            0, idx.flatten(), torch.ones(idx.numel(), dtype=probs.dtype, device=probs.device))
        return E * ((slots / idx.numel()) * probs.mean(dim=0)).sum()

    def _wants_aux(self) -> bool:
        return self.training and torch.is_grad_enabled()

    def _zero3(self) -> bool:
        return hasattr(self.ka_A, "ds_id")  # set on parameters DeepSpeed ZeRO-3 partitions

    # The adapters of a layer reduce to one low-rank product: delta = h Bᵀ with
    # h = [T, total rank] (scaled, gated) and B = [d_out, total rank].
    def _mka_lowrank(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xe = self.expert_dropout(x)
        if not (self.training or self.cfg.keep_na):  # inference without NA: KA only
            return F.linear(xe, self.ka_A) * self.cfg.ka_scale, self.ka_B
        T, E, r = x.shape[0], self.cfg.n_experts, self.cfg.r
        # KA and all experts as one rank-(s+E)·r product; the gates zero the unselected blocks.
        if xe is x:  # no expert dropout active (p=0 or eval): the router rides in the same GEMM
            h = F.linear(x, torch.cat([self.ka_A, self.na_A, self.router.weight]))
            h_ka, h_na, logits = h.split([self.cfg.ka_rank, E * r, E], dim=1)
            gates = self._gates(logits, self.router.bias)
        else:
            gates = self.route(x)
            h_ka, h_na = F.linear(xe, torch.cat([self.ka_A, self.na_A])).split([self.cfg.ka_rank, E * r], dim=1)
        h_na = (h_na.view(T, E, r) * gates.to(h_na.dtype).unsqueeze(-1)).view(T, E * r)
        h = self._scaled(h_ka, self.cfg.ka_scale, h_na)  # scale on the narrow side: cheaper
        return h, torch.cat([self.ka_B, self.na_B], dim=1)

    def _scaled(self, h_ka: torch.Tensor, ka_scale: float, h_other: torch.Tensor, other_scale: float | None = None):
        """[h_ka·ka_scale, h_other·other_scale] (other: NA at α/r, or Align); one multiply when equal (variant code)."""
        other_scale = self.scale if other_scale is None else other_scale
        if ka_scale == other_scale:
            return torch.cat([h_ka, h_other], dim=1) * ka_scale
        return torch.cat([h_ka * ka_scale, h_other * other_scale], dim=1)

    def _da_lowrank(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._orth = self.orth_term() if self._wants_aux() and not self._zero3() else None
        # one dropout on the input of KA and Align, as the authors' DA code (LoRA dropout 0.05 on both)
        h_ka, h_al = F.linear(self.align_dropout(x), torch.cat([self.ka_A, self.align_A])).split(
            [self.cfg.ka_rank, self.cfg.align_r], dim=1)
        h = self._scaled(h_ka, self.cfg.ka_scale, h_al, self.cfg.align_scale)
        B = torch.cat([self.ka_B, self.align_B], dim=1)
        if self.has_na and (self.training or self.cfg.keep_na):  # "DA with NA kept": the routed experts too
            T, E, r = x.shape[0], self.cfg.n_experts, self.cfg.r
            gates = self.route(x)
            h_na = F.linear(self.expert_dropout(x), self.na_A)
            h_na = (h_na.view(T, E, r) * gates.to(h_na.dtype).unsqueeze(-1)).view(T, E * r)
            h, B = torch.cat([h, h_na * self.scale], dim=1), torch.cat([B, self.na_B], dim=1)
        return h, B

    def orth_term(self) -> torch.Tensor:
        """Σ |A_ka A_alignᵀ| with A in nn.Linear layout ([rank, d_in]): an (s·r)×(align_r) matrix.

        Equals the paper's Σ |A_kᵀ A_d| with A in x·A layout ([d_in, rank]). Computed in fp32 (or
        wider) outside autocast, whatever the weights' dtype: a loss term, and a small product."""
        with torch.autocast(self.ka_A.device.type, enabled=False):
            return (_fp32_up(self.ka_A) @ _fp32_up(self.align_A).t()).abs().sum()

    # -- merge -----------------------------------------------------------------------------
    @torch.no_grad()
    def delta_weight(self, fold_ka: bool = True) -> torch.Tensor:
        """s_ka·B_ka A_ka + s_align·B_align A_align in [d_out, d_in] (Eq. 13; the scales: see
        MedCareConfig.ka_scale / align_scale); NA is never folded."""
        W = self.linear.weight
        dt = torch.promote_types(W.dtype, torch.float32)
        d = torch.zeros(W.shape, dtype=dt, device=W.device)
        if fold_ka:
            d += self.cfg.ka_scale * (self.ka_B.to(dt) @ self.ka_A.to(dt))
        if self.has_align:
            d += self.cfg.align_scale * (self.align_B.to(dt) @ self.align_A.to(dt))
        return d


# -- model-level helpers -------------------------------------------------------------------
def core_model(model: nn.Module) -> nn.Module:
    """The transformers model under a DeepSpeed engine and/or a PEFT wrapper."""
    while True:
        if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
            model = model.get_base_model()
        elif type(model).__name__ == "DeepSpeedEngine":
            model = model.module
        else:
            return model


def _names(model: nn.Module, cfg: MedCareConfig, attr: str, table: dict) -> tuple[str, ...]:
    if getattr(cfg, attr) is not None:
        return tuple(getattr(cfg, attr))
    mt = getattr(getattr(core_model(model), "config", None), "model_type", None)
    if mt not in table:
        raise ValueError(f"medcare: no {attr} table entry for model_type {mt!r}; "
                         f"known: {sorted(table)}; or set MedCareConfig.{attr}")
    return table[mt]


def ffn_names(model: nn.Module, cfg: MedCareConfig | None = None) -> tuple[str, ...]:
    return _names(model, cfg or MedCareConfig(), "ffn_modules", FFN_NAMES)


def attn_names(model: nn.Module, cfg: MedCareConfig | None = None) -> tuple[str, ...]:
    return _names(model, cfg or MedCareConfig(), "attn_modules", ATTN_NAMES)


def medcare_modules(model: nn.Module) -> Iterator[tuple[str, MedCareLinear]]:
    """(name relative to the transformers model, wrapper) of every wrapped FFN linear."""
    for name, m in core_model(model).named_modules():
        if isinstance(m, MedCareLinear):
            yield name, m


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def wrap_ffn(model: nn.Module, cfg: MedCareConfig, mode: str) -> list[str]:
    core, wanted = core_model(model), set(ffn_names(model, cfg))
    if any(True for _ in medcare_modules(core)):
        raise ValueError("medcare: the model already has MedCare layers (merge_medcare first)")
    targets = [(n, m) for n, m in core.named_modules()
               if isinstance(m, nn.Linear) and n.rpartition(".")[2] in wanted]
    if not targets:
        raise ValueError(f"medcare: no nn.Linear named {sorted(wanted)} in the model")
    for name, lin in targets:
        set_module(core, name, MedCareLinear(lin, cfg, mode))
    return [n for n, _ in targets]


def set_trainable(model: nn.Module, cfg: MedCareConfig) -> None:
    for _, m in medcare_modules(model):
        for pname, p in m.adapter_parameters():
            p.requires_grad_(cfg.train_ka or pname not in KA_PARAMS)


def inject_mka(model: nn.Module, cfg: MedCareConfig | None = None) -> nn.Module:
    """MKA: FFN linears get KA + NA + router, attention gets PEFT LoRA; base frozen.

    Returns a PeftModel when cfg.attn_lora (the default), else the model itself."""
    cfg = cfg or MedCareConfig()
    for p in model.parameters():
        p.requires_grad_(False)
    wrap_ffn(model, cfg, "mka")
    if cfg.attn_lora:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.attn_dropout, bias="none",
                          target_modules=list(attn_names(model, cfg)), task_type="CAUSAL_LM")
        model = get_peft_model(model, lcfg)
    set_trainable(model, cfg)  # PEFT froze every non-PEFT parameter, ours included
    return model


def inject_da(model: nn.Module, cfg: MedCareConfig | None = None,
              ka: str | Path | dict | None = None, keep_na: str | Path | None = None) -> nn.Module:
    """DA: on a plain model (attention LoRA already merged, frozen), FFN linears get KA + Align.

    `ka`: a directory written by save_ka, or its state dict; None leaves KA freshly initialised
    (e.g. before load_medcare loads it). `keep_na`: an MKA adapter directory (save_medcare) whose
    KA, NA experts and routers are loaded and kept (Table 3's "DA with NA kept"; layers in mode
    da_na, NA trained with the rest)."""
    cfg = cfg or MedCareConfig()
    for p in model.parameters():
        p.requires_grad_(False)
    wrap_ffn(model, cfg, "da_na" if keep_na is not None else "da")
    if keep_na is not None:
        load_mka_experts(model, keep_na)
    elif ka is not None:
        load_ka(model, ka)
    set_trainable(model, cfg)
    return model


def load_mka_experts(model: nn.Module, directory: str | Path) -> nn.Module:
    """KA, NA experts and routers of a saved MKA adapter into da_na layers (strict: every one of
    those tensors, shapes checked; the attention LoRA of the file is already merged in the base)."""
    from safetensors.torch import load_file

    path = Path(directory) / ADAPTER_FILE
    saved = load_file(str(path))
    targets = {f"{n}.{k}": p for n, m in medcare_modules(model) for k, p in m.adapter_parameters()
               if not k.startswith("align_")}
    load_into(targets, {k: v for k, v in saved.items() if ".lora_" not in k}, str(path))
    return model


def orthogonal_loss(model: nn.Module) -> torch.Tensor:
    """L_orth = Σ over wrapped FFN linears of Σ |A_ka A_alignᵀ| (not normalised).

    Uses the terms computed inside the latest grad-enabled training forward (from the live
    parameters, in the forward graph); each term is consumed once. Without such a forward (e.g.
    reentrant gradient checkpointing runs forward under no_grad) it computes from the parameters
    directly, which is the same thing for unsharded parameters and ZeRO-1/2.
    ZeRO-3 is refused: its parameters are empty outside their module's forward/backward, so this
    separate graph branch would get no gradient (the published implementation's defect).
    The caller adds λ·L_orth to the loss BEFORE any gradient-accumulation scaling."""
    terms = []
    for _, m in medcare_modules(model):
        if not m.has_align:
            continue
        if m._zero3():
            raise NotImplementedError("orthogonal_loss: DeepSpeed ZeRO-3 is not supported; use ZeRO-2")
        t, m._orth = m._orth, None
        terms.append(m.orth_term() if t is None else t)
    if not terms:
        raise ValueError("orthogonal_loss: the model has no DA-mode MedCare layers")
    return torch.stack([t.to(terms[0].device) for t in terms]).sum()


def set_token_mask(model: nn.Module, attention_mask: torch.Tensor | None) -> None:
    """Tell the MKA layers which tokens of the coming forward are real ([batch, seq] mask, 1 =
    token; None = all): the balance loss then counts routing of real tokens only, not padding.
    It stays set until the next call, so a gradient-checkpointing recompute in backward sees the
    same mask as the forward it repeats."""
    flat = None if attention_mask is None else attention_mask.reshape(-1).bool()
    for _, m in medcare_modules(model):
        if m.has_na:
            m._token_mask = flat


def balance_loss(model: nn.Module) -> torch.Tensor | None:
    """balance_coef · mean over MKA layers of the Switch load-balancing term of the latest
    training forward; None when balance_coef is 0 (the default) or no such forward ran."""
    terms, coef = [], 0.0
    for _, m in medcare_modules(model):
        if m.has_na and m._balance is not None:
            terms.append(m._balance)
            coef = m.cfg.balance_coef
            m._balance = None
    if not terms:
        return None
    return coef * torch.stack([t.to(terms[0].device) for t in terms]).mean()


# -- save / load ---------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor (FFN MedCare + PEFT attention LoRA), keyed by its name in the
    transformers model (no PEFT / DeepSpeed prefixes)."""
    state = {}
    for name, m in medcare_modules(model):
        for pname, p in m.adapter_parameters():
            state[f"{name}.{pname}"] = p
    for name, p in core_model(model).named_parameters():
        if ".lora_" in name:  # PEFT attention LoRA
            state[name] = p
    return state


def load_into(targets: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], what: str) -> None:
    missing, unexpected = targets.keys() - loaded.keys(), loaded.keys() - targets.keys()
    if missing or unexpected:
        raise ValueError(f"{what}: missing {sorted(missing)[:5]} unexpected {sorted(unexpected)[:5]}")
    with torch.no_grad():
        for k, p in targets.items():
            if p.shape != loaded[k].shape:
                raise ValueError(f"{what}: {k} has shape {tuple(loaded[k].shape)}, expected {tuple(p.shape)}")
            p.copy_(loaded[k])


def config_of(model: nn.Module) -> tuple[MedCareConfig, str]:
    mods = list(medcare_modules(model))
    if not mods:
        raise ValueError("medcare: the model has no MedCare layers")
    return mods[0][1].cfg, mods[0][1].mode


def load_ka(model: nn.Module, ka: str | Path | dict) -> nn.Module:
    """Load KA weights (a save_ka directory or its state dict) into the model's MedCare layers."""
    if not isinstance(ka, dict):
        from safetensors.torch import load_file

        d = Path(ka)
        meta = json.loads((d / KA_CONFIG_FILE).read_text())
        cfg, _ = config_of(model)
        saved = (meta["ka_rank"], meta["alpha"], meta["r"], meta.get("variant", "code"))
        if saved != (cfg.ka_rank, cfg.alpha, cfg.r, cfg.variant):  # the variant sets KA's scale
            raise ValueError(f"{d}: KA saved with rank {saved[0]}, alpha {saved[1]}, r {saved[2]}, variant {saved[3]}; "
                             f"model expects {cfg.ka_rank}, {cfg.alpha}, {cfg.r}, {cfg.variant}")
        ka = load_file(str(d / KA_FILE))
    targets = {f"{n}.{k}": getattr(m, k) for n, m in medcare_modules(model) for k in KA_PARAMS}
    load_into(targets, ka, "load_ka")
    return model
