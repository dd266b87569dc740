"""Per-GPU memory plan of a recipe's training stages, known before anything launches.

For each training stage: weights, gradients and optimizer state under the launcher's ZeRO stage
(DeepSpeed's own estimator formulas, `estimate_zero2/3_model_states_mem_needs`, generalised to a
trainable subset for LoRA / MedCare / C-Poly), activations from micro batch × length × layers ×
hidden (with and without gradient checkpointing), logits from the vocabulary (with the fp32 upcast
the loss makes), the reference model of full DPO, and host RAM at load. `show` and `validate`
print it; `validate` and `run` refuse a stage that cannot fit a GPU (one line naming the knob).

Torch-free and cheap: numbers come from the model's config.json (or a `shape:` block in
conf/model/<name>.yaml when no checkpoint is given) and the stage params. All sizes are bytes;
printed as decimal GB (1e9). The activation counts follow what autograd keeps for a transformers
LLaMA/Qwen2-style decoder layer (bench/bench_memplan.py checks the whole against measured peaks).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GB = 1e9
MARGIN = 0.10          # refuse only when the estimate exceeds the GPU's memory by more than this
CUDA_RUNTIME = 1.0e9   # CUDA context, cuBLAS workspaces, allocator slack per GPU process
# Resident size of one CPU training process beyond its model: python, torch and the trainer stack
# imported, tokenizer, data, allocator arenas. bench/bench_memplan.py measures it on the tiny model
# (peak RSS minus the model-dependent parts: 650-880 MiB per stage on torch 2.13 CPU, BENCHMARKS.md);
# the CPU plan adds it so that it compares with a process's peak RSS.
CPU_RUNTIME = 0.75e9


# ---- the model's shape ------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a decoder-only transformer (from config.json keys)."""

    model_type: str
    hidden: int
    layers: int
    intermediate: int      # one FFN projection's width (Qwen-1's config gives twice it)
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @property
    def kv_dim(self) -> int:
        return self.hidden * self.kv_heads // self.heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear of one decoder layer, by the names LoRA targets use."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def layer_params(self) -> int:
        return sum(a * b for a, b in self.linears().values()) + 2 * self.hidden

    @property
    def params(self) -> int:
        embed = self.vocab * self.hidden
        return self.layers * self.layer_params + embed * (1 if self.tied else 2) + self.hidden

    @property
    def largest_layer(self) -> int:
        """Parameters of the largest single module (DeepSpeed's ZeRO-3 gather buffer)."""
        return max(self.vocab * self.hidden, *(a * b for a, b in self.linears().values()))


# names other architectures give the same linears (Baichuan's fused W_pack, Qwen-1's c_attn/w1/w2)
ALIASES = {"W_pack": ("q_proj", "k_proj", "v_proj"), "c_attn": ("q_proj", "k_proj", "v_proj"),
           "qkv_proj": ("q_proj", "k_proj", "v_proj"), "query_key_value": ("q_proj", "k_proj", "v_proj"),
           "w1": ("gate_proj",), "w2": ("up_proj",), "c_proj": ("o_proj", "down_proj"), "dense": ("o_proj",),
           "gate_up_proj": ("gate_proj", "up_proj"), "q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",),
           "o": ("o_proj",)}


def shape_from_config(cfg: dict) -> Shape:
    """A Shape from a config.json dict (LLaMA, Qwen2, Mistral, Baichuan, Qwen-1 key names)."""
    def get(*names: str, default: Any = None) -> Any:
        for n in names:
            if cfg.get(n) is not None:
                return cfg[n]
        if default is None:
            raise KeyError(names[0])
        return default

    mt = str(cfg.get("model_type", "?"))
    hidden = int(get("hidden_size", "n_embd", "d_model"))
    heads = int(get("num_attention_heads", "n_head"))
    inter = int(get("intermediate_size", "ffn_hidden_size", "n_inner", default=4 * hidden))
    if mt == "qwen":  # Qwen-1: intermediate_size counts w1 and w2 together (each is half of it)
        inter //= 2
    return Shape(model_type=mt, hidden=hidden, layers=int(get("num_hidden_layers", "n_layer", "num_layers")),
                 intermediate=inter, heads=heads, kv_heads=int(get("num_key_value_heads", default=heads)),
                 vocab=int(get("vocab_size")), tied=bool(cfg.get("tie_word_embeddings", False)))


def model_shape(model_opts: dict, model_dir: str | None = None) -> tuple[Shape, str] | None:
    """The recipe model's shape and where it was read: a model dir's config.json (model.path, a built
    or converted source), else the model config's `shape:` block, else a tiny source built (cheap,
    cached). None when nothing says (a hub model with no path and no shape block)."""
    candidates = [model_dir, model_opts.get("path")]
    for d in candidates:
        if d and (Path(d).expanduser() / "config.json").is_file():
            path = Path(d).expanduser() / "config.json"
            try:
                return shape_from_config(json.loads(path.read_text())), str(path)
            except (KeyError, ValueError, TypeError):
                return None
    if model_opts.get("shape"):
        return shape_from_config(dict(model_opts["shape"])), f"model.shape ({model_opts.get('name', '?')})"
    if model_opts.get("path") is None and (model_opts.get("source") or "tiny") == "tiny":
        from . import registry

        built = registry.model_source("tiny").materialize(model_opts)
        return model_shape({}, built)
    return None


# ---- how a stage trains ------------------------------------------------------------------------
@dataclass
class Setup:
    """The launcher side of a plan: ranks, ZeRO stage, offload, GPU or CPU, 16-bit or fp32."""

    world: int = 1
    gpus_per_node: int = 1
    zero: int = 0                # 0: no DeepSpeed (local / DDP); 2 or 3
    offload_optimizer: bool = False
    offload_param: bool = False
    gpu: bool = False            # the plan is for GPUs (else: one CPU process, fp32)
    attn: str = "sdpa"           # model.attn_implementation (eager keeps the s×s scores)
    weights_dtype: str | None = None  # model.dtype when set (e.g. float32)


def setup_of(cfg: Any) -> Setup:
    from omegaconf import OmegaConf

    from .launch import planned_world_size

    launcher = OmegaConf.to_container(cfg.launcher, resolve=True)
    name = launcher.get("name", "local")
    s = Setup(world=planned_world_size(launcher), gpu=name != "local" or device_memory() is not None)
    s.gpus_per_node = int(launcher.get("num_gpus") or 1) if name != "local" else 1
    if name != "local" and launcher.get("deepspeed", True) and "deepspeed" in cfg:
        zero = (OmegaConf.to_container(cfg.deepspeed, resolve=True) or {}).get("zero_optimization") or {}
        s.zero = int(zero.get("stage", 0))
        s.offload_optimizer = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
        s.offload_param = (zero.get("offload_param") or {}).get("device", "none") not in ("none", None)
    s.attn = cfg.model.get("attn_implementation") or "sdpa"
    dtype = cfg.model.get("dtype")
    s.weights_dtype = None if dtype in (None, "auto") else str(dtype)
    return s


@dataclass
class Adapter:
    """Trainable parameters and the extra activations per token per layer of a stage's adapter."""

    trainable: int                # over the whole model
    extra_per_token_layer: float  # bytes per token per layer, in activation elements × their bytes
    name: str


def _targets(shape: Shape, names: list[str] | None) -> list[tuple[int, int]]:
    linears = shape.linears()
    if not names or any(n in ("all-linear", "all_linear") for n in names):
        return list(linears.values())
    out: list[tuple[int, int]] = []
    for n in names:
        base = n.split(".")[-1]
        out += [linears[c] for c in ALIASES.get(base, (base,)) if c in linears]
    return out or list(linears.values())


def adapter_of(kind: str, params: Any, shape: Shape, act: int) -> Adapter | None:
    """The stage's adapter (None = full-parameter training). `act`: bytes per activation element.
    Per adapted linear, autograd keeps the dropout output (act bytes + a 1-byte mask per input
    element) when the adapter has dropout, and the low-rank hidden (rank elements)."""
    L = shape.layers

    def lowrank(targets: list[tuple[int, int]], rank: int, dropout: float, extra: float = 0.0) -> tuple[int, float]:
        trainable = L * sum(rank * (i + o) for i, o in targets)
        keep = sum(i for i, _ in targets) * ((act + 1) if dropout > 0 else 0) + len(targets) * 2 * rank * act
        return trainable, keep + extra

    if kind in ("medcare_mka", "medcare_da"):
        mc = params.medcare
        ffn = [shape.linears()[n] for n in ("gate_proj", "up_proj", "down_proj")]
        if kind == "medcare_mka":  # KA (rank s·r) + E experts (rank r) + router per FFN linear; LoRA r on attention
            rank = mc.s * mc.r + mc.n_experts * mc.r
            t, a = lowrank(ffn, rank, mc.expert_dropout, extra=len(ffn) * 3 * mc.n_experts * 4)
            t += L * sum(i * mc.n_experts + mc.n_experts for i, _ in ffn)
            if mc.attn_lora:
                attn = [shape.linears()[n] for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
                t2, a2 = lowrank(attn, mc.r, mc.attn_dropout)
                t, a = t + t2, a + a2
            return Adapter(t, a, f"MedCare MKA (KA {mc.s * mc.r} + {mc.n_experts}×{mc.r} experts)")
        rank = (mc.s * mc.r if mc.train_ka else 0) + (mc.align_rank or mc.s * mc.r)
        t, a = lowrank(ffn, rank, mc.align_dropout)
        return Adapter(t, a, f"MedCare DA (KA + Align, rank {mc.s * mc.r} + {mc.align_rank or mc.s * mc.r})")
    if kind == "cpoly" and getattr(params, "adapter", "lora") == "cpoly":
        cp = params.cpoly
        rank = (cp.n_shared_skills + cp.n_task_skills) * cp.r
        t, a = lowrank(_targets(shape, cp.target_modules), rank, cp.dropout)
        return Adapter(t, a, f"C-Poly ({cp.n_shared_skills} shared + {cp.n_task_skills} task skills, r {cp.r})")
    peft = getattr(params, "peft", None)
    if peft is None and kind == "cpoly":
        from types import SimpleNamespace

        peft = SimpleNamespace(r=8, dropout=0.05, target_modules=None)  # the LoRA baseline's default
    if peft is None:
        return None
    t, a = lowrank(_targets(shape, list(peft.target_modules or [])), peft.r, peft.dropout)
    return Adapter(t, a, f"LoRA r {peft.r}")


# ---- the plan -----------------------------------------------------------------------------------
@dataclass
class StageMemory:
    stage: str
    kind: str
    parts: dict[str, float]                 # GPU (or CPU process) bytes by component
    host: float                             # host RAM per node at load (+ offloaded states)
    tokens: int                             # tokens per device per forward
    checkpointing: bool
    note: str = ""
    what: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def token_count(kind: str, params: Any, micro: int) -> int:
    length = getattr(params, "block_size", None) if kind == "cpt" else None
    length = length or params.max_length
    pairs = 2 if kind == "dpo" else 1  # DPO runs chosen and rejected of every pair in one forward
    return micro * length * pairs


def layer_activation_bytes(shape: Shape, tokens: int, act: int, attn: str, length: int) -> float:
    """What autograd keeps of one decoder layer for `tokens` tokens (no recomputation):
    two RMSNorms (fp32 input, normalised and weighted outputs), the rotated q, k and v the attention
    keeps (k/v repeated to all heads for grouped-query attention), its output and o_proj's input,
    and the gated MLP's gate, SiLU, up and product (each intermediate wide); eager attention also
    keeps the s×s probabilities of every head."""
    h, i = shape.hidden, shape.intermediate
    kv = h if shape.kv_heads < shape.heads else shape.kv_dim
    per_token = 2 * (4 * h + 2 * act * h) + act * (3 * h + 2 * kv + 4 * i)
    if attn == "eager":
        per_token += 2 * act * shape.heads * length
    return per_token * tokens


def plan_stage(name: str, kind: str, params: Any, shape: Shape, setup: Setup, micro: int,
               checkpointing: bool | None = None) -> StageMemory:
    ckpt = bool(getattr(params, "gradient_checkpointing", False)) if checkpointing is None else checkpointing
    precision = getattr(params, "precision", "auto")
    mixed = setup.gpu and precision in ("auto", "bf16", "fp16")
    act = 2 if mixed else 4
    P, W, Z = shape.params, setup.world, setup.zero
    adapter = adapter_of(kind, params, shape, act)
    T = adapter.trainable if adapter else P
    # weights as loaded (medpipe's policy: LoRA-like adapters in 16-bit, full training in fp32 with
    # autocast); DeepSpeed casts the module to 16-bit when bf16/fp16 is on.
    if setup.weights_dtype:
        wb = 4 if setup.weights_dtype == "float32" else 2
    elif Z:
        wb = 2 if mixed else 4
    else:
        wb = 2 if (mixed and adapter) else 4
    parts: dict[str, float] = {}
    shard = W if Z == 3 else 1
    weights = 0.0 if setup.offload_param else P * wb / shard
    if Z == 3:
        weights += 4 * shape.largest_layer  # DeepSpeed: the largest layer gathered whole
    if adapter and not Z and wb == 2:
        weights += T * 2  # PEFT keeps the adapter weights in fp32 beside the 16-bit base
    parts["weights"] = weights
    if mixed and not Z and not adapter:
        parts["weights"] += 2 * P  # autocast's 16-bit copies of every weight, kept for backward
    # gradients and optimizer state: DeepSpeed's 18 bytes per trainable parameter for mixed
    # precision (2 16-bit grads + 4 fp32 grads + 4 fp32 master weights + 8 Adam moments), split
    # over the ranks under ZeRO; without DeepSpeed: grads in the weights' dtype, Adam 8 bytes.
    if Z:  # (ZeRO-3's estimator counts 18 bytes per parameter over the ranks, its 16-bit weights included)
        grads = (wb + (4 if wb == 2 else 0)) * T / W if Z < 3 else max(18 - 12 - wb, wb) * T / W
        optim = 12 * T / W
        if setup.offload_optimizer:  # fp32 grads, master weights and moments live in host RAM
            grads, optim = wb * T / W, 0.0
    else:
        tb = 4 if adapter else wb
        grads, optim = tb * T * (2 if W > 1 else 1), 8 * T  # DDP: its gradient buckets beside .grad
    parts["gradients"], parts["optimizer"] = grads, optim
    if kind == "dpo" and adapter is None:  # full DPO: a frozen copy of the input model is the reference
        parts["reference model"] = P * wb / shard
    tokens = token_count(kind, params, micro)
    length = tokens // max(micro * (2 if kind == "dpo" else 1), 1)
    layer = layer_activation_bytes(shape, tokens, act, setup.attn, length)
    layer += (adapter.extra_per_token_layer * tokens) if adapter else 0
    if ckpt:  # each layer's input kept; one layer's activations recomputed at a time in backward
        acts = shape.layers * shape.hidden * act * tokens + layer
    else:
        acts = shape.layers * layer
    parts["activations"] = acts + tokens * shape.hidden * (4 + 2 * act)  # + the final norm
    # logits: the lm_head output, its fp32 upcast for the loss (16-bit runs) and the fp32
    # log-softmax / its gradient: 2 + 4 + 4 bytes per logit in bf16, 4 + 4 in fp32
    parts["logits"] = tokens * shape.vocab * (act + (4 if act < 4 else 0) + 4)
    parts["runtime"] = CUDA_RUNTIME if setup.gpu else CPU_RUNTIME
    host = host_bytes(P, T, wb, setup, shape)
    what = [f"{P / 1e9:.2f} B params" if P >= 1e9 else f"{P / 1e6:.1f} M params", (f"{adapter.name}: {T / 1e6:.2f} M trainable" if adapter else "full"),
            f"{tokens} tokens/device", "checkpointing" if ckpt else "no checkpointing",
            f"ZeRO-{Z}" + (" offload" if setup.offload_optimizer or setup.offload_param else "") if Z else
            ("DDP" if W > 1 else "1 process"), "bf16" if mixed else "fp32"]
    return StageMemory(name, kind, parts, host, tokens, ckpt, what=what)


def host_bytes(P: int, T: int, wb: int, setup: Setup, shape: Shape) -> float:
    """Host RAM per node: each rank's process and the weights it reads at load, plus what ZeRO
    offloads (DeepSpeed's cpu_mem estimators, with the trainable count for optimizer state)."""
    ranks = setup.gpus_per_node
    per_rank = (CUDA_RUNTIME if setup.gpu else CPU_RUNTIME) + P * wb / (setup.world if setup.zero == 3 else 1)
    host = ranks * per_rank
    nodes = max(setup.world // max(ranks, 1), 1)
    if setup.zero == 2 and setup.offload_optimizer:
        host += T * max(4 * setup.world, 16) * 1.5 / nodes
    elif setup.zero == 3 and setup.offload_optimizer:
        host += (P * 2 * (1 if setup.offload_param else 0) + T * 16) / nodes * 1.5
    return host


# ---- the recipe ---------------------------------------------------------------------------------
def device_memory() -> float | None:
    """Bytes of the smallest visible GPU, or None without one: torch's own count only when torch is
    already imported (importing it costs a second), else nvidia-smi when it is on PATH."""
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        try:
            if torch.cuda.is_available():
                return float(min(torch.cuda.get_device_properties(i).total_memory
                                 for i in range(torch.cuda.device_count())))
        except Exception:  # a broken driver: fall back to the configured size
            return None
        return None
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        sizes = [float(x) for x in out.split()]
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    return min(sizes) * 2 ** 20 if sizes else None


def gpu_memory(cfg: Any) -> tuple[float, str]:
    found = device_memory()
    if found is not None:
        return found, "this machine's GPU"
    gb = cfg.launcher.get("gpu_memory_gb") or 80
    return float(gb) * GB, f"launcher.gpu_memory_gb={gb:g}"


def training_plans(plans: list) -> list:
    from .params import GlobalBatch

    return [p for p in plans if p.cls.trains and isinstance(p.params, GlobalBatch)]


def plan_recipe(cfg: Any, plans: list, model_dir: str | None = None) -> tuple[list[StageMemory], str | None]:
    """Each training stage's plan, and where the model's shape came from (None: unknown shape)."""
    from omegaconf import OmegaConf

    found = model_shape(OmegaConf.to_container(cfg.model, resolve=True), model_dir)
    if found is None:
        return [], None
    shape, where = found
    setup = setup_of(cfg)
    out = []
    for p in training_plans(plans):
        try:
            micro, _ = p.params.batch_layout(setup.world)
        except ValueError:
            continue  # the batch check names it
        out.append(plan_stage(p.name, p.kind, p.params, shape, setup, micro))
    return out, where


def lines(cfg: Any, memories: list[StageMemory], where: str | None) -> list[str]:
    if where is None:
        return ["# memory plan: the model's shape is unknown (set model.path to a checkpoint with a config.json)"]
    setup = setup_of(cfg)
    cap, source = gpu_memory(cfg)
    unit = "GPU" if setup.gpu else "CPU process (one, fp32)"
    out = [f"# memory plan per {unit} (GB; model shape from {where}"
           + (f"; GPU memory {cap / GB:.0f} GB from {source})" if setup.gpu else ")")]
    for m in memories:
        parts = ", ".join(f"{k} {v / GB:.2f}" for k, v in m.parts.items() if v)
        flag = ""
        if setup.gpu and m.total > cap * (1 + MARGIN):
            flag = "  DOES NOT FIT"
        elif setup.gpu and m.total > cap * (1 - MARGIN):
            flag = "  tight"
        out.append(f"#  {m.stage} [{m.kind}] {m.total / GB:.2f} GB{flag} = {parts}; host RAM at load "
                   f"{m.host / GB:.1f} GB ({'; '.join(m.what)})")
    return out


def refusal(cfg: Any, plans: list, model_dir: str | None = None,
            planned: tuple[list[StageMemory], str | None] | None = None) -> str | None:
    """One line when a training stage's estimate exceeds the GPU's memory by more than MARGIN,
    naming the stage and the knob that makes it fit; None when all fit (or on a CPU-only local run).
    `planned`: plan_recipe's result when the caller has it (the run plan does)."""
    memories, where = planned or plan_recipe(cfg, plans, model_dir)
    setup = setup_of(cfg)
    if where is None or not setup.gpu:
        return None
    cap, source = gpu_memory(cfg)
    by_name = {p.name: p for p in plans}
    shape = model_shape(_model_opts(cfg), model_dir)[0]  # type: ignore[index]
    for m in memories:
        if m.total <= cap * (1 + MARGIN):
            continue
        p = by_name[m.stage]
        fix = _fix(p, shape, setup, cap)
        return (f"stages.{m.stage}: needs ~{m.total / GB:.0f} GB per GPU (activations {m.parts['activations'] / GB:.0f}, "
                f"logits {m.parts['logits'] / GB:.0f}, weights+grads+optimizer "
                f"{(m.parts['weights'] + m.parts['gradients'] + m.parts['optimizer']) / GB:.0f}), the GPU has "
                f"{cap / GB:.0f} GB ({source}); {fix}")
    return None


def _model_opts(cfg: Any) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg.model, resolve=True)


def _fix(p: Any, shape: Shape, setup: Setup, cap: float) -> str:
    """The smallest change that fits: checkpointing, then a smaller micro batch, then ZeRO-3."""
    fits = lambda m: m.total <= cap * (1 + MARGIN)  # noqa: E731
    micro, _ = p.params.batch_layout(setup.world)
    ckpt = bool(getattr(p.params, "gradient_checkpointing", False))
    knob = f"stages.{p.name}"
    if not ckpt:
        m = plan_stage(p.name, p.kind, p.params, shape, setup, micro, checkpointing=True)
        if fits(m):
            return f"set {knob}.gradient_checkpointing=true (~{m.total / GB:.0f} GB)"
    for smaller in range(micro - 1, 0, -1):
        if p.params.batch_size % (smaller * setup.world):
            continue
        m = plan_stage(p.name, p.kind, p.params, shape, setup, smaller, checkpointing=True)
        if fits(m):
            on = "" if ckpt else f"{knob}.gradient_checkpointing=true "
            return f"set {on}{knob}.micro_batch_size={smaller} (~{m.total / GB:.0f} GB)"
    if p.cls.refuses_zero3:
        return "even micro_batch_size=1 with checkpointing does not fit: more GPUs (ZeRO-2 splits gradients and optimizer state)"
    if setup.zero != 3:
        return "even micro_batch_size=1 with checkpointing does not fit: use deepspeed=zero3 (or zero3_offload)"
    if not (setup.offload_param and setup.offload_optimizer):
        return "even micro_batch_size=1 with checkpointing does not fit: use deepspeed=zero3_offload or more GPUs"
    return "even micro_batch_size=1 with checkpointing does not fit: more GPUs or a smaller max_length"


def zero3_refusal(cfg: Any, plans: list) -> str | None:
    """A stage whose kind cannot train under ZeRO-3 (class attribute `refuses_zero3` = why)."""
    setup = setup_of(cfg)
    if setup.zero != 3:
        return None
    for p in training_plans(plans):
        why = p.cls.refuses_zero3
        if why:
            return f"stages.{p.name}: kind {p.kind} cannot run under DeepSpeed ZeRO-3 ({why}); use deepspeed=zero2"
    return None
