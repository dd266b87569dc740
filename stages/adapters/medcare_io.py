"""MedCare adapters on disk and out of the model: save/load the whole adapter (routers included),
the KA hand-off, the merge into a plain model (Eq. 13), the typed stage hand-off and the keep-NA
inference loader. Training-only module (torch at top level), like the layers in medcare.py."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medpipe.stages.adapters.medcare import (ADAPTER_FILE, CONFIG_FILE, FORMAT, KA_CONFIG_FILE, KA_FILE, KA_PARAMS,
                                             MedCareConfig, config_of, core_model, load_into, set_module, set_trainable,
                                             wrap_ffn, adapter_state_dict, inject_mka, medcare_modules)


def _save_tensors(state: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(path))


def save_medcare(model: nn.Module, directory: str | Path) -> Path:
    """Write medcare_adapter.safetensors (all adapter tensors, routers included) + medcare_config.json."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg, mode = config_of(model)
    _save_tensors(adapter_state_dict(model), d / ADAPTER_FILE)
    meta = {"format": FORMAT, "mode": mode, "config": cfg.to_dict(),
            "model_type": getattr(core_model(model).config, "model_type", None),
            "modules": [n for n, _ in medcare_modules(model)]}
    (d / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return d


def load_medcare(model: nn.Module, directory: str | Path) -> nn.Module:
    """Inject into a plain transformers model and load the saved adapter state (strict).

    `model` must be the base the adapter was trained on: the original base for an MKA adapter,
    the MKA hand-off model (attention LoRA merged) for a DA adapter."""
    from safetensors.torch import load_file

    d = Path(directory)
    meta = json.loads((d / CONFIG_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{d / CONFIG_FILE}: not a {FORMAT} config")
    cfg = MedCareConfig.from_dict(meta["config"])
    if meta["mode"] == "mka":
        model = inject_mka(model, cfg)
    else:  # da / da_na: the layers only, every tensor comes from the file
        for p in model.parameters():
            p.requires_grad_(False)
        wrap_ffn(model, cfg, meta["mode"])
        set_trainable(model, cfg)
    load_into(adapter_state_dict(model), load_file(str(d / ADAPTER_FILE)), str(d / ADAPTER_FILE))
    return model


def save_ka(model: nn.Module, directory: str | Path) -> Path:
    """Write the KA weights only (what MKA hands to DA): medcare_ka.safetensors + medcare_ka.json."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg, _ = config_of(model)
    state = {f"{n}.{k}": getattr(m, k) for n, m in medcare_modules(model) for k in KA_PARAMS}
    _save_tensors(state, d / KA_FILE)
    meta = {"format": FORMAT, "r": cfg.r, "alpha": cfg.alpha, "s": cfg.s, "ka_rank": cfg.ka_rank,
            "variant": cfg.variant, "model_type": getattr(core_model(model).config, "model_type", None)}
    (d / KA_CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return d


# -- merge ---------------------------------------------------------------------------------
@torch.no_grad()
def merge_medcare(model: nn.Module, fold_ka: bool = True) -> nn.Module:
    """Fold adapters into the base weights and return a plain transformers model.

    PEFT attention LoRA is merged (merge_and_unload); on every FFN wrapper
    W ← W + (α/r)(B_ka A_ka + B_align A_align) and the original nn.Linear is put back.
    NA experts and routers are dropped, never folded. fold_ka=False drops KA too (the MKA
    hand-off: save_ka first, then merge attention only). Not for ZeRO-3-partitioned models:
    merge after training on a consolidated model."""
    if type(model).__name__ == "DeepSpeedEngine":
        model = model.module
    if hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        model = model.merge_and_unload()
    model = core_model(model)
    for name, m in list(medcare_modules(model)):
        W = m.linear.weight
        W.copy_((W.to(torch.promote_types(W.dtype, torch.float32)) + m.delta_weight(fold_ka)).to(W.dtype))
        set_module(model, name, m.linear)
    return model


@dataclass
class MedCareHandoff:
    """What an MKA/DA stage hands on (stored as `Artifact.handoff`): the attention-merged base DA
    trains on, the KA weights, the full adapter (routers included, for ablations) and the model it
    applies to, and whether inference keeps the routed experts (the keep-NA ablation)."""

    base: str | None = None
    ka: str | None = None
    adapter: str | None = None
    adapter_base: str | None = None
    keep_na: bool = False

    def record(self) -> dict:
        return {"medcare": dataclasses.asdict(self)}

    @classmethod
    def of(cls, art: Any) -> "MedCareHandoff | None":
        data = (getattr(art, "handoff", None) or {}).get("medcare")
        return cls(**data) if data else None


def load_for_inference(art: Any):
    """The keep-NA ablation evaluates MKA with its routed experts: base + the full adapter, NA kept.
    None when the artifact's plain model is what inference should load."""
    from medpipe.stages.models import loader

    h = MedCareHandoff.of(art)
    if h is None or not h.keep_na:
        return None
    base = loader.load_causal_lm(h.adapter_base, dtype=loader.pick_dtype("auto", training=False),
                                 trust_remote_code=art.trust_remote_code, device="auto")
    model = load_medcare(base, h.adapter)
    for _, layer in medcare_modules(model):
        layer.cfg.keep_na = True
    return model.eval()
