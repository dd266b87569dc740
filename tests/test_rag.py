"""RAG: chunking, BM25 retrieval of the one passage holding an answer, the cached index and its
corpus fingerprint, the dense (faiss + sentence-transformers) option, RAG eval end to end."""
from __future__ import annotations

import json

import pytest

from _evalrun import samples, tiny_artifact
from medpipe.stages.evaluation.rag import RagParams, build_or_load, chunk_text, passages_block, tokens

FACTS = [
    "Migraine presents with recurrent one-sided throbbing headache; triptans treat attacks.",
    "Gout presents with a hot swollen first toe joint; colchicine or NSAIDs treat flares.",
    "Asthma presents with wheeze and cough at night; inhaled corticosteroids control it.",
    "The Zorblax syndrome is treated first-line with quintaplex infusions every fortnight.",
    "帕金森病典型表现为静止性震颤和运动迟缓，一线治疗为左旋多巴。",
    "痛风急性发作表现为第一跖趾关节红肿热痛，一线治疗为秋水仙碱。",
]


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDPIPE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "kb.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in FACTS), encoding="utf-8")
    return path


def test_chunks_overlap_and_cover_the_text():
    text = "".join(str(i % 10) for i in range(100))
    chunks = chunk_text(text, 30, 10)
    assert all(len(c) <= 30 for c in chunks) and chunks[0] == text[:30] and chunks[1].startswith(text[20:30])
    assert chunks[-1].endswith(text[-5:])
    assert chunk_text("short", 30, 10) == ["short"]
    with pytest.raises(ValueError):
        chunk_text(text, 10, 10)


def test_char_tokens_have_cjk_bigrams_and_latin_words():
    assert tokens("The Gout 痛风") == ["gout", "痛", "风", "痛风"]


def test_question_answered_in_one_passage_retrieves_it(corpus):
    idx = build_or_load(RagParams(index=str(corpus), k=5), say=lambda m: None)
    hits = idx.search(["How is Zorblax syndrome treated?", "帕金森病的一线治疗是什么？"], k=2)
    assert "quintaplex" in hits[0][0]["text"]
    assert "左旋多巴" in hits[1][0]["text"]
    assert hits[0][0]["score"] > hits[0][1]["score"]
    block = passages_block(hits[1], "zh")
    assert block.startswith("参考资料：\n[1] ") and "左旋多巴" in block


def test_index_is_cached_and_rebuilt_when_the_corpus_changes(corpus):
    said = []
    first = build_or_load(RagParams(index=str(corpus)), say=said.append)
    assert first.rebuilt == "no index yet" and any("built" in m for m in said)
    said.clear()
    again = build_or_load(RagParams(index=str(corpus)), say=said.append)
    assert again.rebuilt is None and not said  # loaded from the cache, nothing rebuilt
    assert again.dir == first.dir
    corpus.write_text(json.dumps({"text": "Only one fact now: the Quux fever responds to zembrin."}) + "\n")
    third = build_or_load(RagParams(index=str(corpus)), say=said.append)
    assert third.rebuilt and "different corpus" in third.rebuilt
    assert any("rebuilding, because it was built from a different corpus" in m for m in said)
    assert "zembrin" in third.search(["What treats Quux fever?"], 1)[0][0]["text"]


def test_an_index_dir_built_from_another_corpus_is_rebuilt(corpus, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "Unrelated text about cardiology."}) + "\n")
    shared = str(tmp_path / "kb-index")
    build_or_load(RagParams(index=str(other), dir=shared), say=lambda m: None)
    said = []
    idx = build_or_load(RagParams(index=str(corpus), dir=shared), say=said.append)
    assert idx.rebuilt and "different corpus" in said[0]
    assert len(idx.chunks) == len(FACTS)


def test_dense_retriever_with_a_local_embedding_model(corpus):
    from medpipe.stages.models.tiny import ensure_tiny

    p = RagParams(index=str(corpus), retriever="dense", embedding_model=str(ensure_tiny()), k=3)
    idx = build_or_load(p, say=lambda m: None)
    assert idx.kind == "dense" and (idx.dir / "dense.faiss").is_file()
    hits = idx.search([FACTS[3]], 3)[0]
    assert len(hits) == 3 and hits[0]["text"] == FACTS[3]  # a passage is its own nearest neighbour
    assert build_or_load(p, say=lambda m: None).rebuilt is None


def test_dense_needs_a_local_model(corpus):
    from medpipe.errors import ConfigError

    with pytest.raises(ConfigError, match="embedding_model"):
        build_or_load(RagParams(index=str(corpus), retriever="dense"))


def test_rag_eval_on_the_sample_mcq_set_runs_end_to_end(tmp_path, monkeypatch):
    from medpipe.stages.eval import EvalParams
    from medpipe.stages.evaluation.runner import evaluate

    monkeypatch.setenv("MEDPIPE_CACHE", str(tmp_path / "cache"))
    p = EvalParams(data={"path": f"{samples()}/mcq_cmexam.csv", "format": "cmexam"}, limit=12,
                   rag=RagParams(index=f"{samples()}/pretrain.jsonl", k=5))
    metrics, results = evaluate(p, tiny_artifact(), tmp_path / "out", say=lambda m: None)
    assert set(metrics) == {"cmexam+rag/acc", "cmexam+rag/f1_weighted"}
    assert results["cmexam+rag"]["rag"] is True and results["cmexam+rag"]["n"] == 12
    details = [json.loads(line) for line in (tmp_path / "out" / "details" / "cmexam+rag.jsonl").read_text().splitlines()]
    assert len(details) == 12 and all(d["pred"] for d in details)
