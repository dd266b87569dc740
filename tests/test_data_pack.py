"""pack_texts: full blocks, EOS between docs, datasets cache hit on rerun."""
import pytest

from medpipe.data import pack, pack_texts
from medpipe.stages.models.toytok import build_tokenizer, sample_texts


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(sample_texts(300), vocab_size=600)


def test_blocks_are_full_and_eos_separated(tok, tmp_path):
    texts = sample_texts(400, seed=3)
    ds = pack_texts(texts, tok, 64, cache_dir=tmp_path)
    total = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)
    assert len(ds) == total // 64
    rows = ds["input_ids"]
    assert all(len(r) == 64 for r in rows)
    flat = [i for r in rows for i in r]
    assert tok.pad_token_id not in flat            # 100% non-pad
    assert flat.count(tok.eos_token_id) >= len(flat) // 200
    first = tok(texts[0], add_special_tokens=False)["input_ids"]
    assert flat[:len(first) + 1] == first + [tok.eos_token_id]


def test_cache_hit_does_not_retokenize(tok, tmp_path, monkeypatch):
    texts = sample_texts(300, seed=4)
    ds1 = pack_texts(texts, tok, 32, cache_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.startswith("medpipe-pack-") for n in files)

    def boom(*a, **k):
        raise AssertionError("re-tokenized")
    monkeypatch.setattr(pack, "_tokenize_batch", boom)
    ds2 = pack_texts(texts, tok, 32, cache_dir=tmp_path)
    assert ds2.cache_files == ds1.cache_files
    assert ds2["input_ids"] == ds1["input_ids"]
    # another block size reuses the tokenized cache (only the packing step reruns)
    ds3 = pack_texts(texts, tok, 16, cache_dir=tmp_path)
    assert len(ds3) >= 2 * len(ds1)
    # different texts → a new fingerprint → tokenization needed
    with pytest.raises(AssertionError, match="re-tokenized"):
        pack_texts(texts + ["new doc"], tok, 32, cache_dir=tmp_path)


def test_multiprocess_same_result(tok, tmp_path):
    texts = sample_texts(600, seed=5)
    a = pack_texts(texts, tok, 48)
    b = pack_texts(texts, tok, 48, num_proc=2, cache_dir=tmp_path)
    assert a["input_ids"] == b["input_ids"]


def test_streamed_packing_gives_the_same_blocks(tok, tmp_path):
    """pack_stream (texts read once from an iterator, blocks cut batch by batch carrying the
    remainder) == pack_texts (everything in memory); a rerun memory-maps the cached blocks."""
    texts = sample_texts(700, seed=6)
    want = pack_texts(texts, tok, 40)["input_ids"]
    got = pack.pack_stream(iter(texts), tok, 40, "spec-fp-1", tmp_path, writer_batch=64)
    assert got["input_ids"] == want
    again = pack.pack_stream(iter([]), tok, 40, "spec-fp-1", tmp_path)
    assert again["input_ids"] == want and again.cache_files
