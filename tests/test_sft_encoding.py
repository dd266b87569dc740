"""SFT: loss only on assistant tokens of every turn; tokenised data cached on disk."""
from __future__ import annotations

from transformers import AutoTokenizer

from medpipe.stages.training.chat_data import encode_chat, encode_dataset
from medpipe.stages.models.tiny import ensure_tiny

CONVO = [
    {"role": "system", "content": "You are a careful physician."},
    {"role": "user", "content": "I have a fever and a cough."},
    {"role": "assistant", "content": "How long have you had them?"},
    {"role": "user", "content": "三天了。"},
    {"role": "assistant", "content": "建议查血常规并多饮水。"},
]


def test_mask_covers_exactly_the_assistant_turns():
    tok = AutoTokenizer.from_pretrained(ensure_tiny())
    enc = encode_chat(CONVO, tok, max_length=4096)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert tok.decode(ids) == tok.apply_chat_template(CONVO, tokenize=False)  # same text as the template
    spans, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            spans.append(tok.decode(current))
            current = []
    if current:
        spans.append(tok.decode(current))
    assert spans == ["How long have you had them?<|im_end|>\n", "建议查血常规并多饮水。<|im_end|>\n"]


def test_truncation_keeps_the_start_and_drops_conversations_without_assistant_tokens(tmp_path):
    tok = AutoTokenizer.from_pretrained(ensure_tiny())
    short = encode_chat(CONVO, tok, max_length=10)
    assert len(short["input_ids"]) == 10 and not any(short["assistant_masks"])
    ds = encode_dataset([{"messages": CONVO}, {"messages": CONVO[:3]}], tok, 10, tmp_path)
    assert len(ds) == 0
    ds = encode_dataset([{"messages": CONVO}, {"messages": CONVO[:3]}], tok, 4096, tmp_path)
    assert len(ds) == 2
    cached = list(tmp_path.glob("sft-*"))
    assert len(cached) == 2  # one per (data, max_length)
    again = encode_dataset([{"messages": CONVO}, {"messages": CONVO[:3]}], tok, 4096, tmp_path)
    assert again.cache_files and again["input_ids"] == ds["input_ids"]  # read back from disk
