"""C-Poly layer forward+backward on a mixed-task batch vs a plain PEFT LoRA layer with the same
trainable parameter count (issue 8). Same process, interleaved reps, median after warm-up.

    /work/main/.venv/bin/python bench/bench_cpoly_layer.py [--d 1024 --batch 8 --seq 256 --tasks 3
                                                            --shared 4 --rank 4 --reps 20]
    ... --device cuda --dtype bf16 --tokens 4096   # on a GPU machine (bench/gpu_check.sh calls this)

--tokens N: batch × seq = N (seq = N / batch). --dtype bf16: what a GPU run trains in — the frozen
base weight, the input and the upstream gradient in bf16, the adapters (C-Poly's and PEFT's) fp32
beside it, the forward under torch.autocast(device, bf16) (the Trainer's bf16 on the local launcher).

Also times two alternatives to the chosen implementation (for the design record):
  gather  - shared skills as one concatenated product, the task-specific skill through a per-example
            gathered A/B (bmm), i.e. only the active rank columns are computed;
  pertask - loop over the tasks present in the batch (index_select / index_add per task).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from medpipe.stages.adapters.cpoly import CPolyConfig, CPolyLinear, _TaskState


def peft_lora_layer(base: nn.Linear, r: int) -> nn.Module:
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    cfg = LoraConfig(r=r, lora_alpha=r)
    layer = LoraLinear(base, "default", cfg, r=r, lora_alpha=r)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.02)
    return layer


class GatherCPoly(nn.Module):
    """Alternative: shared skills concatenated, task skill gathered per example (bmm)."""

    def __init__(self, ref: CPolyLinear):
        super().__init__()
        self.ref = ref

    def forward(self, x, task_ids):
        L = self.ref
        r, A = L.r, L.n_shared
        res = L.base_layer(x)
        w = L.allocation(task_ids)  # [b, A+T]
        ws = w[:, :A].repeat_interleave(r, -1)[:, None, :]
        h = F.linear(x, L.cpoly_A[:A * r]) * ws
        out = F.linear(h, L.cpoly_B[:, :A * r])
        At = L.cpoly_A[A * r:].view(L.n_tasks, r, -1)[task_ids]            # [b, r, d_in]
        Bt = L.cpoly_B[:, A * r:].view(-1, L.n_tasks, r).permute(1, 2, 0)[task_ids]  # [b, r, d_out]
        wt = w[:, A:].gather(1, task_ids[:, None])[:, :, None]            # [b, 1, 1]
        ht = torch.bmm(x, At.transpose(1, 2)) * wt
        out = out + torch.bmm(ht, Bt)
        return res + out


class PerTaskCPoly(nn.Module):
    """Alternative: a Python loop over the distinct tasks of the batch."""

    def __init__(self, ref: CPolyLinear):
        super().__init__()
        self.ref = ref

    def forward(self, x, task_ids):
        L = self.ref
        r, A = L.r, L.n_shared
        res = L.base_layer(x)
        out = torch.zeros_like(res)
        w_all = L.allocation(task_ids)
        for t in task_ids.unique().tolist():
            sel = (task_ids == t).nonzero().squeeze(1)
            cols = list(range(A * r)) + list(range((A + t) * r, (A + t + 1) * r))
            cols_t = torch.tensor(cols)
            w = torch.cat([w_all[sel, :A], w_all[sel, A + t:A + t + 1]], 1).repeat_interleave(r, -1)[:, None, :]
            xs = x.index_select(0, sel)
            h = F.linear(xs, L.cpoly_A[cols_t]) * w
            out = out.index_add(0, sel, F.linear(h, L.cpoly_B[:, cols_t]))
        return res + out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--shared", type=int, default=4)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=None, help="batch × seq; sets seq = tokens / batch")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                    help="fp32 (default) | bf16: bf16 base, input and gradient, fp32 adapters, bf16 autocast")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = ap.parse_args()
    if args.tokens is not None:
        if args.tokens % args.batch:
            ap.error(f"--tokens {args.tokens} is not a multiple of --batch {args.batch}")
        args.seq = args.tokens // args.batch
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    d, T = args.d, args.tasks
    base = nn.Linear(d, d, bias=False, device=dev)
    base.weight.requires_grad_(False)
    state = _TaskState()
    cp = CPolyLinear(base, T, CPolyConfig(n_shared_skills=args.shared, r=args.rank), state).train()
    with torch.no_grad():
        cp.cpoly_B.normal_(0, 0.02)
    n_cp = sum(p.numel() for p in cp.parameters() if p.requires_grad)
    eq_rank = round(n_cp / (2 * d))
    lora = peft_lora_layer(base, eq_rank).train()
    n_lora = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    gather, pertask = GatherCPoly(cp), PerTaskCPoly(cp)
    base.to(dtype)  # the frozen base in the run's dtype; C-Poly (adapter_dtype float32) and LoRA stay fp32
    for p in lora.parameters():
        if p.requires_grad:
            p.data = p.data.float()

    x = torch.randn(args.batch, args.seq, d, device=dev, dtype=dtype, requires_grad=True)
    g = torch.randn(args.batch, args.seq, d, device=dev, dtype=dtype)
    task_ids = torch.arange(args.batch, device=dev) % T  # mixed-task batch
    state.task_ids = task_ids
    autocast = torch.autocast(dev.type, dtype, enabled=dtype != torch.float32)

    def step(fn):
        with autocast:
            y = fn()
        y.backward(g)
        if dev.type == "cuda":
            torch.cuda.synchronize()  # time the kernels, not their launch

    def zero():
        for m in (cp, lora):
            for p in m.parameters():
                p.grad = None
        x.grad = None

    runs = {
        "frozen base linear only": lambda: step(lambda: base(x)),
        "cpoly (concat, chosen)": lambda: step(lambda: cp(x)),
        "lora r=%d (PEFT)" % eq_rank: lambda: step(lambda: lora(x)),
        "cpoly gather (alt)": lambda: step(lambda: gather(x, task_ids)),
        "cpoly per-task loop (alt)": lambda: step(lambda: pertask(x, task_ids)),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    keys = list(runs)
    for i in range(args.warmup + args.reps):
        for k in keys[i % len(keys):] + keys[:i % len(keys)]:  # rotate the order every rep
            fn = runs[k]
            zero()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times[k].append(dt)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    lora_key = "lora r=%d (PEFT)" % eq_rank
    print(f"device={dev} {args.dtype} d={d} batch={args.batch}x{args.seq} tasks={T} A={args.shared} r={args.rank} "
          f"threads={args.threads} reps={args.reps} (median ms, fwd+bwd)")
    print(f"trainable params: cpoly {n_cp}  lora r={eq_rank} {n_lora}")
    for k, v in med.items():
        print(f"  {k:28s} {v:8.2f} ms   ratio vs lora {v / med[lora_key]:.3f}")
    ratio = med["cpoly (concat, chosen)"] / med[lora_key]
    b = med["frozen base linear only"]
    print(f"adapter path only (minus the frozen base): cpoly {med['cpoly (concat, chosen)'] - b:.2f} ms, "
          f"lora {med[lora_key] - b:.2f} ms, ratio "
          f"{(med['cpoly (concat, chosen)'] - b) / max(med[lora_key] - b, 1e-9):.3f}")
    print(f"RESULT cpoly/lora = {ratio:.3f} (target <= 1.3) -> {'PASS' if ratio <= 1.3 else 'FAIL'}")


if __name__ == "__main__":
    main()
