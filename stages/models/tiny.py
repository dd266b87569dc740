"""The embedded default model: a tiny random-init causal LM (Qwen2 or Llama architecture) with a
byte-level BPE tokenizer trained on the bundled sample corpus and a ChatML chat template.

Built on first use and cached under $MEDPIPE_CACHE (default ~/.cache/medpipe) in a directory named
by the hash of its spec and corpus, so every run and test shares one copy and a changed spec
builds a new one. It loads with `from_pretrained` like any real checkpoint: the training code paths
are the real ones.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

BUILDER_VERSION = 2
DEFAULT_SPEC = {
    "arch": "qwen2",
    "hidden_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 344,
    "vocab_size": 4096,
    "max_position": 4096,
    "seed": 0,
}
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML, as Qwen1.5-Chat and MedCare use it (system prompt "You are a helpful assistant.").
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


from medpipe.paths import cache_root  # noqa: E402  (re-exported: the tiny model lives in the cache)


# Samples bundled after the tiny model's corpus was settled (an eval stand-in, the RL recipe's exam
# items and format-teaching conversations, the KTO feedback sample) stay out of the tokenizer's corpus: the tiny model (and so
# every stage key, digest and cached store built on it) does not change when a sample is added.
LATER_SAMPLES = ("promptcblue.jsonl", "mcq_rlvr_en.jsonl", "sft_rlvr_en.jsonl", "kto_feedback_en.jsonl")


def corpus_files() -> list[Path]:
    from importlib import resources

    root = Path(str(resources.files("medpipe.samples")))
    return sorted(p for p in root.iterdir() if p.suffix in (".jsonl", ".json", ".csv", ".txt")
                  and p.name not in LATER_SAMPLES)


def tiny_spec_hash(spec: dict) -> str:
    full = {**DEFAULT_SPEC, **spec, "builder": BUILDER_VERSION}
    h = hashlib.sha256(json.dumps(full, sort_keys=True).encode())
    for f in corpus_files():
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def ensure_tiny(spec: dict | None = None) -> Path:
    spec = {**DEFAULT_SPEC, **(spec or {})}
    unknown = set(spec) - set(DEFAULT_SPEC)
    if unknown:
        from medpipe.errors import ConfigError

        raise ConfigError(f"model.tiny: unknown keys {sorted(unknown)} (allowed: {', '.join(DEFAULT_SPEC)})")
    out = cache_root() / f"tiny-{spec['arch']}-{tiny_spec_hash(spec)}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tiny-"))
    try:
        _quietly(build, spec, tmp, log=out.parent / f"{out.name}.build.log")
        try:
            os.replace(tmp, out)
        except OSError:  # another process built it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _quietly(fn, *args, log: Path) -> None:
    """Run `fn` with what the libraries print (DeepSpeed's "Setting accelerator to CPU" warning on
    its first import, transformers' "Writing model shards" bar) in `log`, as stages keep theirs in
    launcher.log; MEDPIPE_VERBOSE=1 shows it."""
    from medpipe.console import StageDisplay

    with StageDisplay(log).quiet():
        fn(*args)


def corpus_texts() -> list[str]:
    """Every string in the bundled sample files (JSON values, CSV cells, text lines)."""
    import csv

    texts: list[str] = []

    def walk(obj) -> None:
        if isinstance(obj, str):
            texts.append(obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    for f in corpus_files():
        raw = f.read_text(encoding="utf-8-sig")
        if f.suffix == ".csv":
            for row in csv.reader(raw.splitlines(keepends=True)):
                texts.extend(row)
        elif f.suffix == ".txt":
            texts.extend(raw.splitlines())
        else:
            try:
                walk(json.loads(raw))
            except ValueError:  # JSON lines
                for line in raw.splitlines():
                    if line.strip():
                        walk(json.loads(line))
    return texts


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus_texts(), trainer=trainer)
    # as Qwen1.5-Chat: end of turn <|im_end|> is the eos (generation stops there), <|endoftext|> pads
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|endoftext|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(spec: dict, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    tok = build_tokenizer(spec["vocab_size"])
    common = dict(
        vocab_size=len(tok), hidden_size=spec["hidden_size"], intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_layers"], num_attention_heads=spec["num_heads"],
        num_key_value_heads=spec["num_kv_heads"], max_position_embeddings=spec["max_position"],
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )
    if spec["arch"] == "qwen2":
        config = Qwen2Config(**common)
    elif spec["arch"] == "llama":
        config = LlamaConfig(**common)
    else:
        from medpipe.errors import ConfigError

        raise ConfigError(f"model.tiny.arch: '{spec['arch']}' is not supported (qwen2, llama)")
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)


class TinySource:
    """The `tiny` model source (entry point `medpipe.models: tiny`): `model.tiny` is the spec."""

    def identity(self, opts: dict) -> str:
        return tiny_spec_hash(opts.get("tiny") or {})

    def materialize(self, opts: dict) -> str:
        return str(ensure_tiny(opts.get("tiny") or {}))
