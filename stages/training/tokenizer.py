"""The tokenizer a training stage checks its data with before anything trains: the model dir
must hold a model (not only a tokenizer), the tokenizer must load, and stages that train on
conversations need a chat template (the stage's own `chat_template` wins)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def require_model_dir(model_path: str) -> None:
    """A local model directory the loader can build a model from: not empty, has config.json
    (a tokenizer alone passes AutoTokenizer and then fails at training as "Unrecognized model")."""
    from medpipe.errors import MedpipeError

    p = Path(model_path)
    if not p.is_dir():
        return  # a Hub id (allow_hub) or a model source's output: the loader decides
    if not any(p.iterdir()):
        raise MedpipeError(f"model.path {model_path}: the directory is empty (no model was saved there)")
    if not (p / "config.json").is_file():
        raise MedpipeError(f"model.path {model_path}: no config.json (a tokenizer alone is not a model; point "
                           f"model.path at the checkpoint directory)")


def length_tokenizer(tokenizer_path: str, trust_remote_code: bool):
    """The model dir's tokenizer, or one line saying why there is none: what validate counts token
    lengths with for stages that need no chat template (CPT, DPO — it renders through one when
    there is one —, C-Poly's ppl format, VoC labelling)."""
    from medpipe.errors import MedpipeError
    from medpipe.stages.models.loader import load_tokenizer

    require_model_dir(tokenizer_path)
    try:
        return load_tokenizer(tokenizer_path, trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise MedpipeError(f"model.path {tokenizer_path}: no tokenizer can be loaded from it "
                           f"({str(e).splitlines()[0][:160]})") from None


def load_stage_tokenizer(tokenizer_path: str, params: Any, trust_remote_code: bool):
    """The stage's tokenizer with the template it will train with; one line when there is none."""
    from medpipe.errors import MedpipeError

    tok = length_tokenizer(tokenizer_path, trust_remote_code)
    if getattr(params, "chat_template", None):
        tok.chat_template = params.chat_template
    if not tok.chat_template:
        raise MedpipeError(f"the tokenizer at {tokenizer_path} has no chat template, which SFT needs; "
                           f"set chat_template on the stage (a Jinja string) or use a chat model's tokenizer")
    return tok
