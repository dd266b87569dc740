"""Chat data for training: the chat-template check, assistant-only loss masks, the tokenised
dataset (cached on disk). Shared by every kind that trains on conversations (sft, MedCare, C-Poly)."""
from __future__ import annotations

from typing import Any


def check_chat_data(params: Any, base: Any, data_opts: dict) -> list[str]:
    """Before any training: the tokenizer can render chats, every record reads; summary lines."""
    from medpipe.data import load_records
    from medpipe.stages.training.params import data_options

    require_chat_template(base.tokenizer_path, params, base.trust_remote_code)
    result = load_records(params.data, "chat", **data_options(params, data_opts))
    return result.summary_table().splitlines()


def require_chat_template(tokenizer_path: str, params: Any, trust_remote_code: bool) -> None:
    from transformers import AutoTokenizer

    from medpipe.errors import MedpipeError

    if params.chat_template:
        return
    tok = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=trust_remote_code)
    if not tok.chat_template:
        raise MedpipeError(f"the tokenizer at {tokenizer_path} has no chat template, which SFT needs; "
                           f"set chat_template on the stage (a Jinja string) or use a chat model's tokenizer")


def encode_chat(messages: list[dict], tok: Any, max_length: int) -> dict:
    """Token ids and a mask that is 1 exactly on assistant tokens (every assistant turn).

    The template is rendered for growing prefixes of the conversation; the text an assistant turn
    adds (its content and end-of-turn marker) is marked. Works for any template whose rendering of
    a prefix is a prefix of the whole rendering (ChatML, Llama, Baichuan...); others are refused.
    """
    spans: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError("the chat template does not render conversations prefix by prefix; "
                             "cannot locate assistant turns")
        spans += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    ids: list[int] = []
    mask: list[int] = []
    for text, is_assistant in spans:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [int(is_assistant)] * len(piece)
    return {"input_ids": ids[:max_length], "assistant_masks": mask[:max_length]}


def encode_dataset(records: list[dict], tok: Any, max_length: int, cache_dir=None):
    """Tokenised conversations, cached on disk by (conversations, tokenizer, template, max_length)."""
    import hashlib
    import json

    from datasets import Dataset, load_from_disk

    from medpipe.data.pack import tokenizer_digest

    key = hashlib.sha256(json.dumps([r["messages"] for r in records], ensure_ascii=False).encode())
    key.update(f"{tokenizer_digest(tok)}|{tok.chat_template}|{max_length}".encode())
    path = cache_dir / f"sft-{key.hexdigest()[:20]}" if cache_dir is not None else None
    if path is not None and (path / "dataset_info.json").is_file():
        return load_from_disk(str(path))
    rows = [encode_chat(r["messages"], tok, max_length) for r in records]
    rows = [r for r in rows if any(r["assistant_masks"])]  # truncated past every assistant token
    ds = Dataset.from_list(rows)
    if path is not None:
        tmp = path.with_name(path.name + f".tmp{__import__('os').getpid()}")
        ds.save_to_disk(str(tmp))
        try:
            tmp.rename(path)
        except OSError:  # another process cached it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return ds
