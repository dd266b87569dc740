"""C-Poly: customizable combination of shared and task-specific LoRA skills (AntGLM-Med stage 3).

The layer, its allocation matrix, the PEFT-Poly-compatible wrapper and the merge-per-task
export, on one weight layout; each helper below says which part of the formula it is.

What a C-Poly layer computes (the AntGLM-Med paper): for an example of task t,

    y = W0 x + s * ( sum_i w_i^t phi_i(x)  +  sum_j v_j^t phi^t_j(x) ),     phi(x) = B A x (a LoRA),

with ``A`` shared skills (default 4, all tasks) and ``B`` task-specific skills per task (default 1,
used only by its task), every skill of rank ``r`` (default 4) and scale ``s = alpha / r``
(``alpha`` defaults to ``r``: s = 1, as PEFT LoRA with its default alpha=r).
Every layer has its own allocation matrix ``W in R^{T x (A + T*B)}``:

* shared block (T x A): learned logits, init U(-1e-3, 1e-3) (as PEFT Poly). Weights are
  Gumbel-sigmoid samples in training, ``w = sigmoid((logit + log u - log(1-u)) / tau)``, u ~ U(0,1)
  (tau = 1: the relaxed Bernoulli of PEFT Poly), plain ``sigmoid(logit)`` in eval mode
  (deterministic, no tau), then divided by their sum (+1e-12) as PEFT Poly does
  (``normalize=False`` turns that off). ``straight_through=True`` uses the hard value 1[w > 0.5] in
  the forward pass and the soft sample's gradient (before the normalisation).
  Noise is drawn independently per example and per layer.
* task-specific block (T x T*B): identity-initialised, learnable, used as raw weights (no sigmoid,
  no normalisation). ``task_block="diagonal"`` (default) learns only the task's own entries
  (the other entries stay exactly 0), which is the METHODS formula ``w^t phi^t(x)``: task t never
  uses another task's specific skill. ``task_block="full"`` makes the whole T x T block learnable
  (off-diagonal entries start at 0 and may grow).
* LoRA init: every A Kaiming-uniform (a = sqrt 5), every B zero -> the adapted model starts equal
  to the base model. ``B=0`` (``n_task_skills=0``) is Poly with output mixing.

Relation to PEFT's Poly tuner (``peft.tuners.poly``), decided after reading its source:
* Reused as the model: task ids are a keyword of the model-level ``forward``/``generate`` and reach
  every adapted layer for the duration of that call (PEFT registers per-call pre-hooks; here every
  layer shares one small state object that the wrapper sets, which is cheaper and lets gradient
  checkpointing re-run the forward during backward); router init, relaxed-Bernoulli training /
  sigmoid eval routing, sum normalisation with EPS = 1e-12, Kaiming-A / zero-B init.
* Not reused as code: PEFT Poly *mixes parameters*, ``x (sum_i w_i A_i)(sum_i w_i B_i) / r``, which
  is not the METHODS formula (a weighted sum of the skills' *outputs*, ``sum_i w_i B_i A_i x``); it
  has no task-specific skills, no tau, no straight-through, no merge, and PEFT's PeftType enum is
  closed, so a new tuner type cannot be registered without patching PEFT. C-Poly is therefore its
  own small module (``CPolyLinear`` + ``CPolyModel``) with its own save/load; the plain LoRA
  baseline stays 100 % PEFT (the stage's ``peft`` block through the model loader).

Efficiency (measured in bench/bench_cpoly_layer.py, see BENCHMARKS.md): all skills' A matrices
are one ``[(A+T*B)*r, d_in]`` parameter and all B matrices one ``[d_out, (A+T*B)*r]`` parameter, so a
mixed-task batch costs two GEMMs, exactly those of a plain LoRA of rank (A+T*B)*r (the LoRA with the
same trainable parameter count), plus one element-wise scaling of the [batch, seq, (A+T*B)*r]
low-rank activation by the per-example allocation weights (the scale s folded in). No Python loop
over examples or tasks. Columns of other tasks' specific skills get weight 0 for an example: they
cost (T-1)*B*r extra rank columns, cheaper than gathering per-example weights (bench).

Precision: the adapters are fp32 by default (``adapter_dtype: float32``) beside a bf16 base; under
autocast the two GEMMs run in the autocast dtype (x is not copied to fp32 first); under DeepSpeed
bf16 the engine casts them to bf16 (fp32 masters in its optimizer). Whatever the weights' dtype the
allocation is computed in fp32: the Gumbel-sigmoid noise (bf16 uniforms would have 8 mantissa bits,
a noise cut off at about ±5.5), the sigmoid, the normalisation; the weights are cast to the
activations' dtype only where they scale them. No host sync per layer: the shared-only rows are
selected with ``torch.where`` whether or not there are any.

Task ids: ``model(input_ids, task_ids=...)`` and ``model.generate(..., task_ids=...)`` take a
LongTensor/list of task indices, a list of task names, or one name/index for the whole batch.
When the batch is expanded by generate (beams, num_return_sequences: repeat_interleave), the
layer repeats the per-example ids to match. A task name not in the task list raises
``UnknownTaskError``; with ``unknown_task="shared"`` (config, or per-call ``unknown_task=``) such
an example uses the shared skills only, weighted by the mean over trained tasks of the eval-mode
shared weights (normalised as configured), and no task-specific skill.

Save/load: ``save_cpoly(model, dir)`` writes ``cpoly_adapter.safetensors`` (adapter tensors only,
keyed by layer path) and ``cpoly_config.json`` (config, task list, adapted layers, base model
path); ``load_cpoly(base_model, dir)`` rebuilds it (``CPolyModel.save_pretrained`` = ``save_cpoly``, like
PeftModel it writes the adapter only). ``merge_cpoly(model, task)`` folds the task's
eval-mode combined delta ``s * sum_k w_k B_k A_k`` into each base weight and returns the plain
transformers model (loadable with AutoModelForCausalLM.from_pretrained, no medpipe code needed).

torch/peft are imported inside functions or by this module only (never by medpipe's CLI modules).
Length (~540 lines, a third of it this description): the layer, the model wrapper that routes task
ids, and its save/load/merge are one unit — the wrapper's save_pretrained is save_cpoly, and a
separate I/O module would import this one back (an import loop).
"""
from __future__ import annotations

import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medpipe.stages.adapters.settings import CPolyConfig

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "CPolyConfig",
    "CPolyLinear",
    "CPolyModel",
    "UnknownTaskError",
    "inject_cpoly",
    "load_cpoly",
    "merge_cpoly",
    "save_cpoly",
]

CONFIG_NAME = "cpoly_config.json"
WEIGHTS_NAME = "cpoly_adapter.safetensors"
FORMAT = "medpipe.cpoly"
FORMAT_VERSION = 1
EPS = 1e-12
_U_EPS = 1e-6


def _fp32_up(t: torch.Tensor) -> torch.Tensor:
    """t in fp32, or as it is when already fp32 or wider."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class UnknownTaskError(ValueError):
    """A task name/index with no row in the allocation matrix."""


class _TaskState:
    """Shared by every layer of one CPolyModel: the per-example task indices of the current call.

    Index >= 0: a trained task; -1: shared skills only."""

    __slots__ = ("task_ids",)

    def __init__(self) -> None:
        self.task_ids: torch.Tensor | None = None


class CPolyLinear(nn.Module):
    """A frozen nn.Linear plus C-Poly skills. Parameters (all trainable):

    cpoly_A [(A+T*B)*r, d_in], cpoly_B [d_out, (A+T*B)*r]: skill k = rows/cols k*r:(k+1)*r; skills
    0..A-1 shared, then task t's B specific skills at A + t*B ... A + t*B + B-1.
    cpoly_logits [T, A]: shared-block logits. cpoly_task_w: [T, B] (diagonal) or [T, T*B] (full).
    """

    def __init__(self, base_layer: nn.Linear, n_tasks: int, config: CPolyConfig, state: _TaskState):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"C-Poly adapts nn.Linear only, got {type(base_layer).__name__}")
        if n_tasks <= 0:
            raise ValueError("C-Poly needs at least one task")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.n_tasks = n_tasks
        self.n_shared = config.n_shared_skills
        self.n_task_skills = config.n_task_skills
        self.n_skills = self.n_shared + n_tasks * self.n_task_skills
        self.r = config.r
        self.scaling = config.scaling
        self.tau = config.tau
        self.normalize = config.normalize
        self.straight_through = config.straight_through
        self.task_block = config.task_block
        self._state = state
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

        w = base_layer.weight
        dtype = torch.float32 if config.adapter_dtype == "float32" else w.dtype
        dev = w.device
        kr = self.n_skills * self.r
        self.cpoly_A = nn.Parameter(torch.empty(kr, self.in_features, device=dev, dtype=dtype))
        self.cpoly_B = nn.Parameter(torch.zeros(self.out_features, kr, device=dev, dtype=dtype))
        self.cpoly_logits = nn.Parameter(torch.empty(n_tasks, self.n_shared, device=dev, dtype=dtype))
        if self.n_task_skills > 0:
            if self.task_block == "diagonal":
                tw = torch.ones(n_tasks, self.n_task_skills, device=dev, dtype=dtype)
            else:
                tw = torch.zeros(n_tasks, n_tasks * self.n_task_skills, device=dev, dtype=dtype)
                for t in range(n_tasks):
                    tw[t, t * self.n_task_skills:(t + 1) * self.n_task_skills] = 1.0
            self.cpoly_task_w = nn.Parameter(tw)
        else:
            self.cpoly_task_w = None
        self.reset_parameters(config.init_logit_range)

    @torch.no_grad()
    def reset_parameters(self, init_logit_range: float = 1e-3) -> None:
        for k in range(self.n_skills):  # each skill like nn.Linear's default (PEFT LoRA / Poly)
            nn.init.kaiming_uniform_(self.cpoly_A[k * self.r:(k + 1) * self.r], a=math.sqrt(5))
        nn.init.zeros_(self.cpoly_B)
        nn.init.uniform_(self.cpoly_logits, -init_logit_range, init_logit_range)

    # -- allocation ---------------------------------------------------------------------------
    def shared_weights(self, idx: torch.Tensor) -> torch.Tensor:
        """[n, A] shared-skill weights for task indices idx (>=0), mode-dependent; in fp32 (or
        wider) whatever the parameters' dtype: bf16 uniform noise would have 8 mantissa bits, so
        log u - log(1-u) would take a few hundred values, cut off at about ±5.5."""
        logits = _fp32_up(self.cpoly_logits[idx])
        if self.training:
            u = torch.rand_like(logits).clamp_(_U_EPS, 1.0 - _U_EPS)
            w = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / self.tau)
        else:
            w = torch.sigmoid(logits)
        if self.straight_through:
            w = (w > 0.5).to(w.dtype) + w - w.detach()
        return w

    def allocation(self, task_ids: torch.Tensor) -> torch.Tensor:
        """Per-example skill weights [n, A + T*B] (before the scale s), fp32 (or wider).
        task_ids: -1 = shared only."""
        task_ids = task_ids.to(self.cpoly_logits.device)
        shared_only = task_ids < 0
        idx = task_ids.clamp(min=0)
        parts = []
        if self.n_shared > 0:
            w = self.shared_weights(idx)
            # computed whether or not a row is shared-only: asking (.any()) would be a host sync per
            # layer per forward on a GPU; where() with no such row returns w exactly
            mean_row = torch.sigmoid(_fp32_up(self.cpoly_logits)).mean(0, keepdim=True)
            w = torch.where(shared_only[:, None], mean_row.expand_as(w), w)
            if self.normalize:
                w = w / (w.sum(-1, keepdim=True) + EPS)
            parts.append(w)
        if self.n_task_skills > 0:
            tw = _fp32_up(self.cpoly_task_w[idx])
            if self.task_block == "diagonal":  # scatter own entries into a [n, T*B] row
                b = self.n_task_skills
                cols = idx[:, None] * b + torch.arange(b, device=idx.device)[None, :]
                tw = torch.zeros(idx.shape[0], self.n_tasks * b, device=tw.device,
                                 dtype=tw.dtype).scatter(1, cols, tw)
            tw = tw * (~shared_only)[:, None].to(tw.dtype)
            parts.append(tw)
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    # -- forward / merge ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        task_ids = self._state.task_ids
        if task_ids is None:
            raise RuntimeError(
                "C-Poly layer called without task ids: call the CPolyModel with task_ids=... "
                "(or inside `with model.task_context(task_ids):`)")
        bsz = x.shape[0]
        if task_ids.shape[0] != bsz:
            if x.dim() >= 3 and task_ids.shape[0] > 0 and bsz % task_ids.shape[0] == 0:
                task_ids = task_ids.repeat_interleave(bsz // task_ids.shape[0])  # generate expansion
            else:
                raise RuntimeError(f"task_ids has {task_ids.shape[0]} entries for a batch of {bsz}")
        w = self.allocation(task_ids) * self.scaling                     # [b, S]
        w = w.repeat_interleave(self.r, dim=-1)                          # [b, S*r]
        w = w.view(bsz, *([1] * (x.dim() - 2)), -1)
        # under autocast the GEMMs run in its dtype anyway: no fp32 copy of x
        xa = x if torch.is_autocast_enabled(x.device.type) else x.to(self.cpoly_A.dtype)
        h = F.linear(self.dropout(xa), self.cpoly_A)  # [b, ..., S*r]
        out = F.linear(h * w.to(h.dtype), self.cpoly_B)
        return result + out.to(result.dtype)

    @torch.no_grad()
    def delta_weight(self, task_index: int) -> torch.Tensor:
        """Eval-mode combined Delta W [d_out, d_in] of one task (-1: shared only), float32."""
        was = self.training
        self.train(False)
        try:
            w = self.allocation(torch.tensor([task_index], device=self.cpoly_logits.device))[0]
        finally:
            self.train(was)
        w = (w.float() * self.scaling).repeat_interleave(self.r)
        return (self.cpoly_B.float() * w[None, :]) @ self.cpoly_A.float()

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, tasks={self.n_tasks}, "
                f"shared={self.n_shared}, task_skills={self.n_task_skills}, r={self.r}, "
                f"scaling={self.scaling}")


# ----------------------------------------------------------------------------------------------
def _get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    if "." in name:
        parent_name, child = name.rsplit(".", 1)
        return model.get_submodule(parent_name), child
    return model, name


def _resolve_targets(model: nn.Module, target_modules: list[str] | str | None) -> list[str]:
    if target_modules is None:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAP
        mtype = getattr(getattr(model, "config", None), "model_type", None)
        if mtype not in MAP:
            raise ValueError(f"no default target_modules for model type {mtype!r}: set target_modules")
        target_modules = list(MAP[mtype])
    out_emb = None
    if hasattr(model, "get_output_embeddings"):
        try:
            out_emb = model.get_output_embeddings()
        except Exception:  # pragma: no cover - models without one
            out_emb = None
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or isinstance(mod, CPolyLinear) or not name:
            continue
        if isinstance(target_modules, str) or list(target_modules) == ["all-linear"]:
            if target_modules in ("all-linear", ["all-linear"]):
                ok = mod is not out_emb
            else:
                ok = re.fullmatch(target_modules, name) is not None
        else:
            ok = any(name == t or name.endswith("." + t) for t in target_modules)
        if ok:
            names.append(name)
    if not names:
        raise ValueError(f"target_modules {target_modules!r} matched no nn.Linear in the model")
    return names


def _checkpointing(model: nn.Module) -> bool:
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers 5 / 4
        if attr in type(model).__dict__ or any(attr in vars(k) for k in type(model).__mro__):
            return bool(getattr(model, attr, False))
    return False


class CPolyModel(nn.Module):
    """A transformers causal LM with C-Poly layers; ``forward``/``generate`` take ``task_ids``.

    Attributes not defined here fall through to the wrapped model (``config``, ``device``,
    ``gradient_checkpointing_enable``, ...)."""

    accepts_task_ids = True

    def __init__(self, model: nn.Module, tasks: Sequence[str], config: CPolyConfig,
                 layer_names: list[str], state: _TaskState, requires_grad: dict[str, bool]):
        super().__init__()
        self.model = model
        self.tasks = list(tasks)
        self.cpoly_config = config
        self.layer_names = list(layer_names)
        self._state = state
        self._base_requires_grad = requires_grad

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # -- task ids ------------------------------------------------------------------------------
    def task_index(self, task_ids: Any, unknown_task: str | None = None) -> torch.Tensor:
        """Task names / indices -> LongTensor of indices (-1: shared only)."""
        policy = unknown_task or self.cpoly_config.unknown_task
        if policy not in ("error", "shared"):
            raise ValueError(f"unknown_task must be 'error' or 'shared', got {policy!r}")
        n = len(self.tasks)
        if isinstance(task_ids, torch.Tensor):
            t = task_ids.detach().to(torch.long).reshape(-1)
            bad = (t < 0) | (t >= n)
            if bool(bad.any()):
                if policy == "shared":
                    return torch.where(bad, torch.full_like(t, -1), t)
                raise UnknownTaskError(f"task index {int(t[bad][0])} out of range: tasks are {self.tasks}")
            return t
        if isinstance(task_ids, (str, int)):
            task_ids = [task_ids]
        out = []
        for tid in task_ids:
            if isinstance(tid, torch.Tensor):
                tid = tid.item()
            if isinstance(tid, str):
                if tid in self.tasks:
                    out.append(self.tasks.index(tid))
                    continue
            elif isinstance(tid, int) and 0 <= tid < n:
                out.append(tid)
                continue
            if policy == "shared":
                out.append(-1)
            else:
                raise UnknownTaskError(
                    f"unknown task {tid!r}: this C-Poly adapter was trained on {self.tasks} "
                    "(pass unknown_task='shared' to use the shared skills only)")
        return torch.tensor(out, dtype=torch.long)

    @contextmanager
    def task_context(self, task_ids: Any, unknown_task: str | None = None):
        """Route the given task ids to every C-Poly layer inside the block."""
        prev = self._state.task_ids
        idx = self.task_index(task_ids, unknown_task)
        dev = self._device()
        self._state.task_ids = idx.to(dev) if dev is not None else idx
        sticky = False
        try:
            yield
            # gradient checkpointing re-runs layers during backward, after this call returns:
            # leave the ids of a training forward in place for it (the next call replaces them).
            sticky = self.model.training and torch.is_grad_enabled() and _checkpointing(self.model)
        finally:
            if not sticky:
                self._state.task_ids = prev

    def _device(self):
        for p in self.parameters():
            return p.device
        return None

    def _expand(self, task_ids: Any, batch: int | None) -> Any:
        if batch is not None and isinstance(task_ids, (str, int)):
            return [task_ids] * batch
        return task_ids

    @staticmethod
    def _batch_of(kwargs: dict, args: tuple) -> int | None:
        for key in ("input_ids", "inputs_embeds", "inputs"):
            v = kwargs.get(key)
            if isinstance(v, torch.Tensor):
                return v.shape[0]
        if args and isinstance(args[0], torch.Tensor):
            return args[0].shape[0]
        return None

    def forward(self, input_ids=None, attention_mask=None, labels=None, task_ids=None,
                unknown_task: str | None = None, **kwargs):
        if input_ids is not None:
            kwargs["input_ids"] = input_ids
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if labels is not None:
            kwargs["labels"] = labels
        if task_ids is None:
            return self.model(**kwargs)
        with self.task_context(self._expand(task_ids, self._batch_of(kwargs, ())), unknown_task):
            return self.model(**kwargs)

    def generate(self, *args, task_ids=None, unknown_task: str | None = None, **kwargs):
        if task_ids is None:
            return self.model.generate(*args, **kwargs)
        with self.task_context(self._expand(task_ids, self._batch_of(kwargs, args)), unknown_task):
            return self.model.generate(*args, **kwargs)

    # -- parameters / io -----------------------------------------------------------------------
    def cpoly_layers(self) -> dict[str, CPolyLinear]:
        return {n: self.model.get_submodule(n) for n in self.layer_names}

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, layer in self.cpoly_layers().items():
            for pname in ("cpoly_A", "cpoly_B", "cpoly_logits", "cpoly_task_w"):
                p = getattr(layer, pname)
                if p is not None:
                    out[f"{name}.{pname}"] = p.detach().contiguous()
        return out

    def save_pretrained(self, path: str | os.PathLike, **_: Any) -> None:
        """Like PeftModel: saves the adapter only (merge_cpoly(...).save_pretrained for a full model)."""
        save_cpoly(self, path)


# ----------------------------------------------------------------------------------------------
def inject_cpoly(model: nn.Module, tasks: Sequence[str], config: CPolyConfig | None = None,
                 **overrides: Any) -> CPolyModel:
    """Replace the target nn.Linear layers of ``model`` (in place) by CPolyLinear layers for the
    given task names, freeze everything else, and return the CPolyModel wrapper."""
    if config is None:
        config = CPolyConfig(**overrides)
    elif overrides:
        config = CPolyConfig(**{**asdict(config), **overrides})
    tasks = [str(t) for t in tasks]
    if not tasks:
        raise ValueError("C-Poly needs at least one task name")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"duplicate task names: {tasks}")
    if isinstance(model, CPolyModel):
        raise ValueError("model already has C-Poly layers")
    names = _resolve_targets(model, config.target_modules)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    state = _TaskState()
    for name in names:
        parent, child = _get_submodule_parent(model, name)
        base = getattr(parent, child)
        setattr(parent, child, CPolyLinear(base, len(tasks), config, state))
    return CPolyModel(model, tasks, config, names, state, requires_grad)


def save_cpoly(model: CPolyModel, path: str | os.PathLike) -> None:
    """Write cpoly_adapter.safetensors + cpoly_config.json into ``path``."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    cfg = asdict(model.cpoly_config)
    if isinstance(cfg.get("target_modules"), set):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "tasks": model.tasks,
        "config": cfg,
        "layers": model.layer_names,
        "base_model_name_or_path": getattr(getattr(model.model, "config", None), "_name_or_path", None),
    }
    tensors = {k: v.cpu() for k, v in model.adapter_state_dict().items()}
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    tmp = os.path.join(path, CONFIG_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
    os.replace(tmp, os.path.join(path, CONFIG_NAME))


def load_cpoly(model: nn.Module, path: str | os.PathLike, *, is_trainable: bool = False) -> CPolyModel:
    """Inject the saved C-Poly adapter into base ``model`` (same layer names) and load its tensors.
    Eval mode and frozen adapter unless ``is_trainable``."""
    from safetensors.torch import load_file

    with open(os.path.join(path, CONFIG_NAME), encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a medpipe C-Poly adapter (format={meta.get('format')!r})")
    config = CPolyConfig.from_dict(meta["config"])
    names = list(meta["layers"])  # inject on exactly the saved layers
    config_for_layers = CPolyConfig(**{**asdict(config), "target_modules": names})
    cm = inject_cpoly(model, meta["tasks"], config_for_layers)
    cm.cpoly_config = config
    tensors = load_file(os.path.join(path, WEIGHTS_NAME))
    own = cm.adapter_state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path}: adapter tensors do not match the model "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    with torch.no_grad():
        for name, layer in cm.cpoly_layers().items():
            for pname in ("cpoly_A", "cpoly_B", "cpoly_logits", "cpoly_task_w"):
                p = getattr(layer, pname)
                if p is None:
                    continue
                t = tensors[f"{name}.{pname}"]
                if t.shape != p.shape:
                    raise ValueError(f"{path}: {name}.{pname} has shape {tuple(t.shape)}, "
                                     f"model expects {tuple(p.shape)}")
                p.copy_(t.to(p.dtype))
                p.requires_grad_(is_trainable)
    cm.train(is_trainable)
    return cm


@torch.no_grad()
def merge_cpoly(model: CPolyModel, task: str | int | None, *, shared_only: bool = False) -> nn.Module:
    """Fold task ``task``'s eval-mode combined Delta W into every adapted base weight and return
    the plain transformers model (the CPolyModel is consumed: its layers are replaced in place).
    ``shared_only=True`` (task ignored) merges the shared-skills-only combination."""
    if shared_only:
        idx = -1
    else:
        if task is None:
            raise ValueError("merge_cpoly needs a task (or shared_only=True)")
        idx = int(model.task_index([task], unknown_task="error")[0])
    inner = model.model
    for name in model.layer_names:
        layer = inner.get_submodule(name)
        base = layer.base_layer
        delta = layer.delta_weight(idx)
        base.weight.data += delta.to(base.weight.device, base.weight.dtype)
        parent, child = _get_submodule_parent(inner, name)
        setattr(parent, child, base)
    for n, p in inner.named_parameters():
        p.requires_grad_(model._base_requires_grad.get(n, True))
    model.layer_names = []
    return inner
