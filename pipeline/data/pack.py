"""Tokenization + packing for pretraining text.

Docs are tokenized without special tokens, each followed by EOS, concatenated and cut into
``block_size`` blocks; the last partial block is dropped, so every token is real (no padding).
Tokenization is a batched ``datasets.map`` (``num_proc`` processes when given); both steps are
cached as arrow files in ``cache_dir`` under datasets fingerprints computed from the texts'
sha256, the tokenizer's serialized state and block_size — a rerun loads them instead of
re-tokenizing.
"""
from __future__ import annotations

import hashlib
import json
import os


def _texts_digest(texts) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """Hash of what decides the token ids: the serialized fast tokenizer (minus the transient
    truncation/padding state that a previous call may have left), class and eos id."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None) or tokenizer
    if hasattr(backend, "to_str"):
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        h.update(json.dumps(state, sort_keys=True).encode())
    else:  # slow tokenizer: vocab + name
        h.update(str(getattr(tokenizer, "name_or_path", "")).encode())
        h.update(str(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "eos_token_id", None)).encode())
    return h.hexdigest()


def _tokenize_batch(table, tokenizer):
    """arrow batch of texts → arrow batch of token id lists (no special tokens). Uses the Rust
    backend's ``encode_batch_fast`` directly (no offsets, no python BatchEncoding) when the
    tokenizer is a fast one."""
    import pyarrow as pa
    texts = table.column("text").to_pylist()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        if backend.truncation is not None:
            backend.no_truncation()
        if backend.padding is not None:
            backend.no_padding()
        ids = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    else:
        ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                        return_token_type_ids=False)["input_ids"]
    return pa.table({"input_ids": pa.array(ids, type=pa.list_(pa.int32()))})


def _group(table, block_size: int, eos: int):
    import numpy as np
    import pyarrow as pa
    col = table.column("input_ids").combine_chunks()
    offsets = col.offsets.to_numpy()
    flat = col.values.to_numpy(zero_copy_only=False)
    # EOS after every document
    flat = np.insert(flat, offsets[1:] - offsets[0], eos).astype(np.int32, copy=False)
    n = len(flat) // block_size
    blocks = pa.FixedSizeListArray.from_arrays(pa.array(flat[: n * block_size]), block_size)
    return pa.table({"input_ids": blocks})


def pack_texts(texts, tokenizer, block_size: int, *, num_proc: int | None = None,
               cache_dir: str | os.PathLike | None = None, batch_size: int = 1000):
    """Pack ``texts`` (strings or ``{"text"}`` records) → ``datasets.Dataset`` of ``input_ids``
    blocks of exactly ``block_size`` tokens."""
    from datasets import Dataset

    texts = [t["text"] if isinstance(t, dict) else t for t in texts]
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("pack_texts needs a tokenizer with an eos_token_id")
    if block_size < 2:
        raise ValueError("block_size must be >= 2")
    fp_tok = hashlib.sha256(f"tok:{_texts_digest(texts)}:{tokenizer_digest(tokenizer)}"
                            .encode()).hexdigest()[:32]
    fp_pack = hashlib.sha256(f"pack:{fp_tok}:{block_size}:{eos}".encode()).hexdigest()[:32]
    tok_file = pack_file = None
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        tok_file = os.path.join(str(cache_dir), f"medpipe-tok-{fp_tok}.arrow")
        pack_file = os.path.join(str(cache_dir), f"medpipe-pack-{fp_pack}.arrow")
        if os.path.exists(pack_file):
            # cache hit on the final step: skip building the text table altogether
            return Dataset.from_file(pack_file)
    if num_proc is not None and num_proc <= 1:
        num_proc = None
    ds = Dataset.from_dict({"text": texts}).with_format("arrow")
    tok = ds.map(_tokenize_batch, batched=True, batch_size=batch_size, num_proc=num_proc,
                 remove_columns=["text"], fn_kwargs={"tokenizer": tokenizer},
                 cache_file_name=tok_file, new_fingerprint=fp_tok,
                 load_from_cache_file=True, desc="tokenize")
    packed = tok.map(
        _group, batched=True, batch_size=None, fn_kwargs={"block_size": block_size, "eos": eos},
        cache_file_name=pack_file, new_fingerprint=fp_pack, load_from_cache_file=True,
        desc="pack")
    return packed.with_format(None)


def pack_stream(texts, tokenizer, block_size: int, fingerprint: str, cache_dir, *, num_proc: int | None = None,
                batch_size: int = 1000, writer_batch: int = 10_000, counts: dict | None = None):
    """``pack_texts`` for corpora that do not fit in memory: ``texts`` is an iterable (read once,
    streamed into an Arrow file), tokenisation is the same batched map, and the blocks are cut in
    one sequential pass over the token batches carrying the remainder from batch to batch — the
    same blocks as ``pack_texts`` gives for the same texts (tested), with one batch in memory.
    Cached under ``fingerprint`` (the data spec's, not the texts'): a rerun, a resumed stage or a
    second rank memory-maps the blocks, and the Trainer resumes at its checkpoint's step.
    ``counts`` (optional dict) gets ``documents``: the texts read, also when the blocks come from
    the cache (kept beside them), so a resumed stage reports what it trained on."""
    import numpy as np
    import pyarrow as pa
    from datasets import Dataset, Features, Sequence, Value
    from datasets.arrow_writer import ArrowWriter

    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("pack_stream needs a tokenizer with an eos_token_id")
    key = hashlib.sha256(f"stream:{fingerprint}:{tokenizer_digest(tokenizer)}:{block_size}:{eos}".encode()).hexdigest()[:32]
    os.makedirs(cache_dir, exist_ok=True)
    out_file = os.path.join(str(cache_dir), f"medpipe-stream-{key}.arrow")
    counts_file = out_file[: -len(".arrow")] + ".counts.json"
    if os.path.exists(out_file):
        if counts is not None:
            if os.path.exists(counts_file):
                with open(counts_file, encoding="utf-8") as f:
                    counts.update(json.load(f))
            else:  # blocks cached by an older medpipe: count the texts (a read, no tokenising)
                counts["documents"] = sum(1 for _ in texts)
        return Dataset.from_file(out_file)
    n_docs = 0
    text_file = os.path.join(str(cache_dir), f"medpipe-stream-{key}.text.{os.getpid()}.arrow")
    with ArrowWriter(features=Features({"text": Value("string")}), path=text_file, writer_batch_size=writer_batch) as w:
        for t in texts:
            w.write({"text": t["text"] if isinstance(t, dict) else t})
            n_docs += 1
        w.finalize()
    if num_proc is not None and num_proc <= 1:
        num_proc = None
    docs = Dataset.from_file(text_file).with_format("arrow")
    tok = docs.map(_tokenize_batch, batched=True, batch_size=batch_size, num_proc=num_proc, remove_columns=["text"],
                   fn_kwargs={"tokenizer": tokenizer}, load_from_cache_file=False, desc="tokenize")
    tmp = out_file + f".tmp{os.getpid()}"
    feats = Features({"input_ids": Sequence(Value("int32"), length=block_size)})
    carry = np.zeros(0, dtype=np.int32)
    with ArrowWriter(features=feats, path=tmp, writer_batch_size=writer_batch) as w:
        for table in tok.with_format("arrow").iter(batch_size=writer_batch):
            col = table.column("input_ids").combine_chunks()
            offsets = col.offsets.to_numpy()
            flat = col.values.to_numpy(zero_copy_only=False)
            flat = np.insert(flat, offsets[1:] - offsets[0], eos).astype(np.int32, copy=False)
            flat = np.concatenate([carry, flat])
            n = len(flat) // block_size
            if n:
                w.write_table(pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(
                    pa.array(flat[: n * block_size]), block_size)}))
            carry = flat[n * block_size:]
        w.finalize()
    with open(counts_file + f".tmp{os.getpid()}", "w", encoding="utf-8") as f:
        json.dump({"documents": n_docs}, f)
    os.replace(counts_file + f".tmp{os.getpid()}", counts_file)  # before the blocks: a found block file has its counts
    os.replace(tmp, out_file)
    for f in tok.cache_files:
        try:
            os.remove(f["filename"])
        except OSError:
            pass
    os.remove(text_file)
    if counts is not None:
        counts["documents"] = n_docs
    return Dataset.from_file(out_file)
