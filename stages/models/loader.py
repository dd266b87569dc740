"""The one model loader: tokenizer, causal LM (one dtype policy), LoRA apply and merge.

Every stage, the inference runtime and the commands load models through here, so a model loads
the same way for training, evaluation, chat and serving:
* dtype: `model.dtype` when set (float32 | bfloat16 | float16); else, for training, the stage's
  training precision where nothing needs fp32 weights: a frozen base (LoRA, MedCare, C-Poly: the
  adapters are fp32 beside it) and, under DeepSpeed, a full-parameter model (the engine casts the
  module to bf16/fp16 anyway and keeps its own fp32 master copy in the optimizer; an fp32 load
  would cost every rank twice the host memory for nothing); a full-parameter model trained without
  DeepSpeed keeps fp32 weights (autocast computes in bf16; the optimizer needs fp32 to add small
  updates); fp32 on CPU and in fp32 runs. For inference bf16 (or fp16) on a GPU, fp32 on CPU;
* `trust_remote_code` only when the model (or its artifact) says so;
* a tokenizer without a pad token pads with its eos.
Imports torch/transformers at call time only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from medpipe.errors import MedpipeError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def use_bf16(precision: str) -> bool:
    """Whether a training stage with this `precision` param computes in bf16."""
    import torch

    if precision == "bf16":
        return True
    return precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def pick_dtype(name: str | None, *, training: bool, frozen_base: bool = False, precision: str = "auto",
               deepspeed_half: bool = False):
    """The torch dtype to load weights in (the policy in the module docstring). `frozen_base`: the
    loaded weights are not trained (an adapter stage); `deepspeed_half`: DeepSpeed trains the stage
    in the half precision `precision` gives (it casts the module and keeps fp32 masters itself)."""
    import torch

    if name and name != "auto":
        if name not in DTYPES:
            raise MedpipeError(f"model.dtype must be one of {', '.join(DTYPES)}, got {name!r}")
        return getattr(torch, name)
    if not torch.cuda.is_available():
        return torch.float32
    if training:
        half = half_dtype(precision)
        return half if half is not None and (frozen_base or deepspeed_half) else torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def half_dtype(precision: str):
    """bf16 / fp16 when a stage with this `precision` trains in half precision, else None."""
    import torch

    return torch.bfloat16 if use_bf16(precision) else torch.float16 if precision == "fp16" else None


def deepspeed_casts(config_path: str | None, precision: str) -> bool:
    """Whether the stage's DeepSpeed config (None: no DeepSpeed) trains in the half precision of
    `precision`: its `bf16`/`fp16` block enabled, or "auto" (filled from the same precision)."""
    if not config_path:
        return False
    import json

    cfg = json.loads(Path(config_path).read_text())
    block = {"bf16": cfg.get("bf16") or {}, "fp16": cfg.get("fp16") or {}}
    want = "bf16" if use_bf16(precision) else "fp16" if precision == "fp16" else None
    return want is not None and block[want].get("enabled", False) in (True, "auto")


def training_dtype(name: str | None, params: Any, *, deepspeed_config: str | None = None):
    """The dtype a training stage loads its input model in: frozen when the stage has a `peft`
    block or its kind trains adapters beside a frozen base (`frozen_base` on its params class)."""
    frozen = getattr(params, "peft", None) is not None or bool(getattr(params, "frozen_base", False))
    precision = getattr(params, "precision", "auto")
    return pick_dtype(name, training=True, frozen_base=frozen, precision=precision,
                      deepspeed_half=deepspeed_casts(deepspeed_config, precision))


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str | Path, *, dtype: Any = None, trust_remote_code: bool = False,
                   attn_implementation: str | None = None, device: str | None = None):
    """`AutoModelForCausalLM.from_pretrained` with medpipe's options; `device="auto"` puts it on
    the GPU when there is one."""
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if device == "auto" and cuda():
        model = model.to("cuda")
    return model


def load_for_inference(path: str | Path, *, trust_remote_code: bool = False, dtype: str | None = "auto"):
    """A model ready to generate or score: inference dtype, on the GPU when there is one, eval mode."""
    model = load_causal_lm(path, dtype=pick_dtype(dtype, training=False), trust_remote_code=trust_remote_code,
                           device="auto")
    return model.eval()


def lora_config(lora: Any):
    from peft import LoraConfig

    targets = lora.target_modules
    targets = "all-linear" if list(targets) == ["all-linear"] else list(targets)
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                      task_type="CAUSAL_LM", bias="none")


def apply_lora(model, lora: Any):
    if lora is None:
        return model
    if lora.type != "lora":
        raise MedpipeError(f"peft.type '{lora.type}' is not supported here (lora)")
    from peft import get_peft_model

    return get_peft_model(model, lora_config(lora))


def merge_lora(adapter_dir: str | Path, base_path: str | Path, tokenizer_path: str | Path, out: Path,
               trust_remote_code: bool = False) -> Path:
    """Fold a PEFT LoRA adapter into its base and write a plain model dir at `out` (atomically:
    a reader never sees half a model, a killed merge leaves no partial dir behind)."""
    from peft import PeftModel

    from medpipe.artifact import atomic_dir

    base = load_causal_lm(base_path, dtype="auto", trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        load_tokenizer(tokenizer_path, trust_remote_code).save_pretrained(tmp)
    return out
