"""Benchmark the MedCare FFN layer (issue 7) on CPU: forward + backward, median of reps.

    /work/main/.venv/bin/python bench/bench_medcare_layer.py [--reps 7] [--tokens 2048] [--threads 2]
    ... --device cuda --dtype bf16 --tokens 4096   # on a GPU machine (bench/gpu_check.sh calls this)

--dtype bf16: what a GPU run trains in — the frozen base weight, the input and the upstream gradient
in bf16, the adapters (MedCare's and PEFT's) fp32 beside it, the forward under
torch.autocast(device, bf16) (the Trainer's bf16 on the local launcher / DDP). The equivalence
check of the alternatives runs in fp32 whatever --dtype says.

Compares, in one process, d_in=2048, d_out=5632, T tokens, float32, 2 threads (torch.set_num_threads):
  medcare        the library layer (frozen W + KA rank 32 + top-2 of 8 NA rank 16 + router);
                 KA, all experts and the router's columns as one GEMM on the A side, gates zero
                 the unselected rank blocks, h Bᵀ added into x Wᵀ in place by one addmm_
  base           the frozen nn.Linear alone (what every variant pays; adapter overhead = t − base)
  alt:*          other routed implementations of the same layer (checked equal to `medcare`):
                   cat_A_only  KA+NA fused on the A side, two B products, separate add
                   separate    KA and NA as two separate low-rank products
                   gather      per-expert gather of the selected tokens / index_add back
                   bmm         tokens grouped by expert, padded to capacity, two bmm
  peft_lora      peft.tuners.lora.Linear on the same nn.Linear, rank chosen so that the trainable
                 parameter count equals the MedCare layer's
  dense_stack    the published approach: every expert computed to an [E, T, d_out] stack, weighted
                 by the (zero outside top-K) gates and summed; plus KA
Reps are interleaved over the variants in a freshly shuffled (seeded) order each rep (robust to
load changes on a shared machine and to order effects between neighbours).
The input requires grad (as inside a network), the output gets a fixed random upstream gradient.

Peak memory: each variant runs again in a fresh subprocess: one warm-up forward+backward, grads
freed, the kernel's peak-RSS mark reset (write "5" to /proc/self/clear_refs), then one measured
forward+backward; reported = VmHWM (peak RSS) minus VmRSS just before it, i.e. the extra memory
the step needs on top of weights, input and upstream gradient (activations, gradients, temporaries).
It is process RSS, so it includes allocator slack.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from medpipe.stages.adapters.medcare import MedCareConfig, MedCareLinear

D_IN, D_OUT = 2048, 5632
CFG = MedCareConfig(r=16, alpha=32, s=2, n_experts=8, top_k=2)
DEVICE = torch.device("cpu")  # --device cuda on a GPU machine (timings synchronised, CUDA peak memory)
DTYPE = torch.float32  # --dtype bf16: bf16 base/input/gradient, fp32 adapters, bf16 autocast
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# -- alternative routed implementations (same parameters as MedCareLinear) -------------------
def _ka(m, x):
    return F.linear(F.linear(x, m.ka_A) * m.scale, m.ka_B)


def delta_cat_A_only(m, x):
    gates, (T, E, r) = m.route(x), (x.shape[0], m.cfg.n_experts, m.cfg.r)
    h = F.linear(x, torch.cat([m.ka_A, m.na_A])) * m.scale
    h_ka, h_na = h.split([m.cfg.ka_rank, E * r], dim=1)
    h_na = (h_na.view(T, E, r) * gates.unsqueeze(-1)).view(T, E * r)
    return torch.addmm(F.linear(h_ka, m.ka_B), h_na, m.na_B.t())


def delta_separate(m, x):
    gates, (T, E, r) = m.route(x), (x.shape[0], m.cfg.n_experts, m.cfg.r)
    h = (F.linear(x, m.na_A).view(T, E, r) * gates.unsqueeze(-1)).view(T, E * r)
    return _ka(m, x) + F.linear(h * m.scale, m.na_B)


def delta_gather(m, x):
    """Per expert: gather the tokens that selected it, LoRA on them, index_add back (loop over E)."""
    gates, r = m.route(x), m.cfg.r
    out = _ka(m, x)
    for e in range(m.cfg.n_experts):
        tok = gates[:, e].nonzero().squeeze(1)
        if tok.numel() == 0:
            continue
        A, B = m.na_A[e * r:(e + 1) * r], m.na_B[:, e * r:(e + 1) * r]
        y = F.linear(F.linear(x[tok], A) * (gates[tok, e:e + 1] * m.scale), B)
        out = out.index_add(0, tok, y)
    return out


def delta_bmm(m, x):
    """Group the T·K (token, expert) slots by expert, pad each group to the largest, two bmm."""
    T, E, r, K = x.shape[0], m.cfg.n_experts, m.cfg.r, m.cfg.top_k
    gates = m.route(x)
    idx = gates.topk(K, dim=-1).indices.flatten()            # expert of each slot
    tok = torch.arange(T, device=x.device).repeat_interleave(K)
    order = idx.argsort(stable=True)
    idx, tok = idx[order], tok[order]
    counts = torch.bincount(idx, minlength=E)
    cap = int(counts.max())
    pos = torch.arange(idx.numel(), device=x.device) - (counts.cumsum(0) - counts)[idx]
    xs = x.new_zeros(E, cap, x.shape[1]).index_put((idx, pos), x[tok])
    ws = gates.new_zeros(E, cap, 1).index_put((idx, pos), gates[tok, idx].unsqueeze(1) * m.scale)
    h = torch.bmm(xs, m.na_A.view(E, r, -1).transpose(1, 2)) * ws          # [E, cap, r]
    y = torch.bmm(h, m.na_B.view(-1, E, r).permute(1, 2, 0))               # [E, cap, d_out]
    return _ka(m, x).index_add(0, tok, y[idx, pos])


def delta_dense_stack(m, x):
    """Published approach: all E experts for all tokens -> [E, T, d_out], weighted, summed."""
    gates, r = m.route(x), m.cfg.r
    outs = [F.linear(F.linear(x, m.na_A[e * r:(e + 1) * r]), m.na_B[:, e * r:(e + 1) * r]) * m.scale
            for e in range(m.cfg.n_experts)]
    stack = torch.stack(outs)                                             # [E, T, d_out]
    return _ka(m, x) + (stack * gates.t().unsqueeze(-1)).sum(0)


ALTS = {"cat_A_only": delta_cat_A_only, "separate": delta_separate,
        "gather": delta_gather, "bmm": delta_bmm, "dense_stack": delta_dense_stack}


# -- layers ----------------------------------------------------------------------------------
def make_medcare(seed=0, dtype=None):
    torch.manual_seed(seed)
    m = MedCareLinear(nn.Linear(D_IN, D_OUT, bias=False, device=DEVICE), CFG, "mka").train()
    m.linear.weight.requires_grad_(False)
    with torch.no_grad():  # nonzero B so the equivalence check means something (cost is the same)
        m.ka_B.normal_(0, 0.02), m.na_B.normal_(0, 0.02)
    m.linear.to(dtype or DTYPE)  # the frozen base; the adapters stay fp32 (as on a bf16 base)
    return m


def trainable(mod):
    return sum(p.numel() for p in mod.parameters() if p.requires_grad)


def make_peft(rank):
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT, bias=False, device=DEVICE)
    base.weight.requires_grad_(False)
    layer = LoraLinear(base, "default", LoraConfig(r=rank, lora_alpha=2 * rank), r=rank, lora_alpha=2 * rank)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.02)
    base.to(DTYPE)
    for p in layer.parameters():  # fp32 adapters on a half base, as get_peft_model's autocast_adapter_dtype
        if p.requires_grad:
            p.data = p.data.float()
    return layer


def build(name, peft_rank):
    """(callable forward, module) for a variant."""
    if name == "peft_lora":
        layer = make_peft(peft_rank)
        return layer, layer
    m = make_medcare()
    if name == "medcare":
        return m, m
    if name == "base":
        return m.linear, m.linear
    fn = ALTS[name]
    return (lambda x: m.linear(x) + fn(m, x)), m


def fwd_bwd(f, x, g):
    x.grad = None
    with torch.autocast(DEVICE.type, DTYPE, enabled=DTYPE != torch.float32):
        y = f(x)
    y.backward(g)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()  # time the kernels, not their launch


def inputs(tokens, dtype=None):
    torch.manual_seed(1)
    dt = dtype or DTYPE
    return (torch.randn(tokens, D_IN, device=DEVICE, dtype=dt, requires_grad=True),
            torch.randn(tokens, D_OUT, device=DEVICE, dtype=dt))


def time_all(names, peft_rank, tokens, reps, warmup=2):
    """Median fwd+bwd seconds per variant. Reps are interleaved over the variants, shuffled each
    rep, so that a change in machine load hits all of them alike."""
    built = {n: build(n, peft_rank) for n in names}
    x, g = inputs(tokens)
    for f, _ in built.values():
        for _ in range(warmup):
            fwd_bwd(f, x, g)
    ts = {n: [] for n in names}
    order, rng = list(built), random.Random(0)
    for _ in range(reps):
        # a fresh (seeded) order every rep: no variant always runs right after the same neighbour
        # (e.g. after dense_stack has churned 1 GiB through the allocator)
        rng.shuffle(order)
        for n in order:
            f, mod = built[n]
            mod.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            fwd_bwd(f, x, g)
            ts[n].append(time.perf_counter() - t0)
    return {n: {"ms": 1e3 * statistics.median(ts[n]), "params": trainable(built[n][1])} for n in names}


def check_equal(tokens):
    """Every alternative gives the same output and gradients as the library layer."""
    x, g = inputs(min(tokens, 256), torch.float32)
    ref_m = make_medcare(dtype=torch.float32)
    y = ref_m(x)
    y.backward(g)
    ref = [y.detach(), x.grad.clone()] + [p.grad.clone() for p in ref_m.parameters() if p.requires_grad]
    for name, fn in ALTS.items():
        m = make_medcare(dtype=torch.float32)
        x.grad = None
        y = m.linear(x) + fn(m, x)
        y.backward(g)
        got = [y.detach(), x.grad] + [p.grad for p in m.parameters() if p.requires_grad]
        err = max((a - b).abs().max().item() for a, b in zip(ref, got))
        assert err < 1e-4, f"{name}: max abs diff {err}"


def _status_mib(key):
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith(key + ":")) / 1024


def mem_child(name, peft_rank, tokens):
    torch.set_num_threads(2)
    f, mod = build(name, peft_rank)
    x, g = inputs(tokens)
    fwd_bwd(f, x, g)                    # warm-up: one-time allocator / BLAS buffers
    mod.zero_grad(set_to_none=True)
    x.grad = None
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")                   # reset the peak-RSS mark (VmHWM), Linux >= 4.0
    before = _status_mib("VmRSS")
    fwd_bwd(f, x, g)
    print(json.dumps({"extra_peak_mib": _status_mib("VmHWM") - before}))


def cuda_extra_peak_mib(name, peft_rank, tokens):
    """On a GPU: the allocator's peak during one fwd+bwd above what was allocated before it."""
    f, mod = build(name, peft_rank)
    x, g = inputs(tokens)
    fwd_bwd(f, x, g)
    mod.zero_grad(set_to_none=True)
    x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fwd_bwd(f, x, g)
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def mem_of(name, peft_rank, tokens):
    if DEVICE.type == "cuda":
        return cuda_extra_peak_mib(name, peft_rank, tokens)
    out = subprocess.run([sys.executable, __file__, "--mem-child", name, "--peft-rank", str(peft_rank),
                          "--tokens", str(tokens), "--dtype", next(k for k, v in DTYPES.items() if v == DTYPE)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_peak_mib"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--peft-rank", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda (GPU machines; issue: 4096 tokens)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                    help="fp32 (default) | bf16: bf16 base, input and gradient, fp32 adapters, bf16 autocast")
    ap.add_argument("--mem-child")
    a = ap.parse_args()
    global DEVICE, DTYPE
    DEVICE, DTYPE = torch.device(a.device), DTYPES[a.dtype]
    torch.set_num_threads(a.threads)
    if a.mem_child:
        return mem_child(a.mem_child, a.peft_rank, a.tokens)

    n_mc = trainable(make_medcare())
    peft_rank = round(n_mc / (D_IN + D_OUT))  # LoRA rank r has r·(d_in + d_out) parameters
    check_equal(a.tokens)
    print(f"device={DEVICE} d_in={D_IN} d_out={D_OUT} tokens={a.tokens} {a.dtype} threads={torch.get_num_threads()} "
          f"reps={a.reps} (median, after 2 warm-up)  torch {torch.__version__}")
    print(f"MedCare trainable params {n_mc:,}; equivalent PEFT LoRA rank {peft_rank}")
    names = ["medcare", "base", "peft_lora", *ALTS]
    load0 = os.getloadavg()[0]
    res = time_all(names, peft_rank, a.tokens, a.reps)
    print(f"load average (1 min) before/after timing: {load0:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    base = res["medcare"]["ms"]
    print(f"{'variant':<14}{'fwd+bwd ms':>12}{'vs medcare':>12}{'trainable':>12}")
    for n in names:
        print(f"{n:<14}{res[n]['ms']:>12.1f}{res[n]['ms'] / base:>12.2f}{res[n]['params']:>12,}")
    print(f"ratio medcare / peft_lora   = {base / res['peft_lora']['ms']:.2f}  (target <= 1.2)")
    print(f"ratio dense_stack / medcare = {res['dense_stack']['ms'] / base:.2f}  (target >= 2.5)")
    w = res["base"]["ms"]
    print(f"adapter overhead (t - base): medcare {base - w:.0f} ms, peft_lora {res['peft_lora']['ms'] - w:.0f} ms, "
          f"dense_stack {res['dense_stack']['ms'] - w:.0f} ms -> dense/medcare "
          f"{(res['dense_stack']['ms'] - w) / max(base - w, 1e-9):.1f}x")
    for n in ("medcare", "peft_lora", "dense_stack"):
        kind = "CUDA allocator" if DEVICE.type == "cuda" else "RSS"
        print(f"peak extra {kind} fwd+bwd {n:<12} {mem_of(n, peft_rank, a.tokens):8.0f} MiB")


if __name__ == "__main__":
    main()
