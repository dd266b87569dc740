"""Retrieval-augmented answering (Qilin-Med-RAG): a knowledge index over a pretraining corpus,
top-k passages prepended to the prompt. Used by the eval stage (`rag: {index: ..., k: 5}`),
`medpipe chat --rag` and `medpipe serve --rag`.

Index
  The corpus (any `text` data spec: path, conf/data name, source dict, list) is read with
  `medpipe.data.load_records(spec, "text")`; each document is cut into chunks of
  `chunk_size` characters, consecutive chunks overlapping by `chunk_overlap` characters (a
  document shorter than `chunk_size` is one chunk).
  * `retriever: bm25` (default): bm25s (Lucene BM25, k1=1.5, b=0.75). Tokens (`tokenize`):
    `char` = every CJK character and every CJK character bigram, plus lower-cased Latin
    words/numbers (English stop words dropped); `jieba` = jieba search-mode words.
  * `retriever: dense`: sentence-transformers embeds the chunks with the local model
    `embedding_model` (a sentence-transformers dir, or any HF encoder dir: mean pooling),
    normalised; faiss `IndexFlatIP` (cosine) searches them.
Cache
  An index lives in a directory (`dir`, default `$MEDPIPE_CACHE/rag/<hash of the corpus paths
  and the options>`) holding `index.json` (corpus fingerprint = sha256 of the corpus files and
  spec, options, chunk count), `chunks.jsonl` and the retriever's files. It is built once; a
  later use whose corpus fingerprint or options differ from `index.json` rebuilds it and says so.
Prompt
  `passages_block(passages, lang)` renders "参考资料：\n[1] …" / "Reference passages:\n[1] …";
  the eval stage puts it in the item's context, chat puts it before the user's message.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

from medpipe.params import Checked, param

INDEX_VERSION = 1
RETRIEVERS = ("bm25", "dense")


@dataclass
class RagParams(Checked):
    """Retrieval-augmented prompts: `index` is the corpus to index (null = no RAG)."""

    _where: ClassVar[str] = "rag."
    index: Any = param(None, "corpus data spec (path | conf/data name | source dict | list); null = off")
    k: int = param(5, "passages prepended to each prompt")
    retriever: str = param("bm25", "bm25 | dense", choices=RETRIEVERS)
    embedding_model: Optional[str] = param(None, "local model dir for retriever=dense")
    chunk_size: int = param(256, "characters per chunk")
    chunk_overlap: int = param(32, "characters shared by consecutive chunks")
    tokenize: str = param("char", "bm25 tokens: char (CJK chars + bigrams, Latin words) | jieba",
                          choices=("char", "jieba"))
    dir: Optional[str] = param(None, "index directory (default: $MEDPIPE_CACHE/rag/<hash>)")

    def _rules(self):
        return [("k", self.k >= 1, ">= 1"), ("chunk_size", self.chunk_size >= 1, ">= 1"),
                ("chunk_overlap", 0 <= self.chunk_overlap < self.chunk_size, "in [0, chunk_size)")]


_CJK_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_WORD = re.compile(r"[A-Za-z0-9]+")
_EN_STOP = frozenset("""a an the of and or in on at to for with by from is are was were be been being
as that this these those it its which who whom what when where why how do does did not no than then
there their they them he she his her we our you your i me my can could should would may might will
shall into over under about after before between during per via""".split())


def tokens(text: str, mode: str = "char") -> list[str]:
    """BM25 tokens of a text (see the module docstring)."""
    if mode == "jieba":
        import logging

        import jieba

        jieba.setLogLevel(logging.WARNING)
        out = [t.lower() for t in jieba.lcut_for_search(text) if t.strip()]
        return [t for t in out if t not in _EN_STOP and (len(t) > 1 or _CJK_RUN.match(t) or t.isdigit())]
    if mode != "char":
        raise ValueError(f"rag tokenize must be 'char' or 'jieba', got {mode!r}")
    out = [w.lower() for w in _WORD.findall(text) if w.lower() not in _EN_STOP]
    for run in _CJK_RUN.findall(text):
        out.extend(run)
        out.extend(run[i:i + 2] for i in range(len(run) - 1))
    return out


def chunk_text(text: str, size: int, overlap: int) -> list[str]:
    if size <= 0 or not 0 <= overlap < size:
        raise ValueError(f"need chunk_size > 0 and 0 <= chunk_overlap < chunk_size (got {size}, {overlap})")
    text = text.strip()
    if len(text) <= size:
        return [text] if text else []
    step = size - overlap
    out = []
    for start in range(0, len(text), step):
        out.append(text[start:start + size])
        if start + size >= len(text):
            break
    return out


def _options(p: RagParams) -> dict:
    opts = {"retriever": p.retriever, "chunk_size": p.chunk_size, "chunk_overlap": p.chunk_overlap,
            "version": INDEX_VERSION}
    if p.retriever == "bm25":
        opts["tokenize"] = p.tokenize
    else:
        from medpipe.artifact import model_fingerprint

        opts["embedding_model"] = str(p.embedding_model)
        opts["embedding_fingerprint"] = model_fingerprint(Path(str(p.embedding_model)).expanduser())
    return opts


def index_dir(p: RagParams, base_dir: Any = None) -> Path:
    if p.dir:
        return Path(p.dir).expanduser()
    from medpipe.artifact import stable_hash
    from medpipe.data import parse_spec

    paths = [s.path for s in parse_spec(p.index, base_dir=base_dir)]
    from medpipe.paths import cache_root

    return cache_root() / "rag" / stable_hash({"paths": paths, "retriever": p.retriever, "tokenize": p.tokenize,
                                                "chunk": [p.chunk_size, p.chunk_overlap],
                                                "model": p.embedding_model}, 12)


class KnowledgeIndex:
    """A built index: `search(queries, k)` → per query a list of {id, text, score, doc}."""

    def __init__(self, directory: Path, chunks: list[dict], meta: dict, retriever: Any, embedder: Any = None):
        self.dir, self.chunks, self.meta = directory, chunks, meta
        self._retriever, self._embedder = retriever, embedder
        self.rebuilt: str | None = None  # why it was (re)built this time, None if loaded

    @property
    def kind(self) -> str:
        return self.meta["options"]["retriever"]

    def search(self, queries: list[str], k: int = 5) -> list[list[dict]]:
        if not queries:
            return []
        k = max(1, min(k, len(self.chunks)))
        if self.kind == "bm25":
            mode = self.meta["options"]["tokenize"]
            qtok = [tokens(q, mode) or ["\0"] for q in queries]
            # drop tokens the index has never seen (bm25s refuses them) but keep every query non-empty
            vocab = self._retriever.vocab_dict
            qtok = [[t for t in q if t in vocab] or [next(iter(vocab))] for q in qtok]
            docs, scores = self._retriever.retrieve(qtok, k=k, show_progress=False, n_threads=1)
        else:
            import numpy as np

            emb = self._embedder.encode(list(queries), normalize_embeddings=True, convert_to_numpy=True,
                                        show_progress_bar=False).astype(np.float32)
            scores, docs = self._retriever.search(emb, k)
        out = []
        for qd, qs in zip(docs, scores):
            out.append([{**self.chunks[int(d)], "score": float(s)} for d, s in zip(qd, qs) if int(d) >= 0])
        return out


def build_or_load(p: RagParams, say: Callable[[str], None] = print, base_dir: Any = None,
                  data_opts: dict | None = None) -> KnowledgeIndex:
    """The index of `p.index`, loaded from its directory when its corpus fingerprint and options
    match, else (re)built there (and said why)."""
    from medpipe.errors import ConfigError
    from medpipe.data import fingerprint

    if p.index is None:
        raise ConfigError("rag.index: no corpus given")
    if p.retriever == "dense" and not p.embedding_model:
        raise ConfigError("rag.retriever=dense needs rag.embedding_model (a local model directory)")
    if p.retriever == "dense" and not Path(str(p.embedding_model)).expanduser().is_dir():
        raise ConfigError(f"rag.embedding_model '{p.embedding_model}' is not a local directory")
    directory = index_dir(p, base_dir)
    corpus_fp = fingerprint(p.index, base_dir=base_dir)
    opts = _options(p)
    meta_path = directory / "index.json"
    reason = None
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            meta, reason = {}, "its index.json is unreadable"
        if reason is None and meta.get("corpus_fingerprint") != corpus_fp:
            reason = (f"it was built from a different corpus ({meta.get('corpus', '?')}, fingerprint "
                      f"{str(meta.get('corpus_fingerprint'))[:12]} ≠ {corpus_fp[:12]})")
        elif reason is None and meta.get("options") != opts:
            reason = f"it was built with other options ({meta.get('options')} ≠ {opts})"
        if reason is None:
            try:
                return _load(directory, meta, p)
            except (OSError, ValueError, KeyError) as e:
                reason = f"it could not be loaded ({e})"
        say(f"RAG index at {directory}: rebuilding, because {reason}")
    else:
        reason = "no index yet"
    idx = _build(p, directory, corpus_fp, opts, say, base_dir, data_opts or {})
    idx.rebuilt = reason
    return idx


def _read_chunks(directory: Path) -> list[dict]:
    with open(directory / "chunks.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _load(directory: Path, meta: dict, p: RagParams) -> KnowledgeIndex:
    chunks = _read_chunks(directory)
    if len(chunks) != meta.get("chunks"):
        raise ValueError("chunks.jsonl does not match index.json")
    if meta["options"]["retriever"] == "bm25":
        import bm25s

        retriever = bm25s.BM25.load(str(directory / "bm25"), show_progress=False)
        return KnowledgeIndex(directory, chunks, meta, retriever)
    import faiss

    return KnowledgeIndex(directory, chunks, meta, faiss.read_index(str(directory / "dense.faiss")),
                          _embedder(p.embedding_model))


def _embedder(path: Any):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(Path(str(path)).expanduser()), device="cpu")


def _build(p: RagParams, directory: Path, corpus_fp: str, opts: dict, say, base_dir, data_opts) -> KnowledgeIndex:
    from medpipe.artifact import atomic_dir, write_json_atomic
    from medpipe.data import load_records

    t0 = time.monotonic()
    loaded = load_records(p.index, "text", base_dir=base_dir, on_error=data_opts.get("on_error") or "fail",
                          seed=int(data_opts.get("seed") or 0))
    chunks: list[dict] = []
    for doc, rec in enumerate(loaded.records):
        for piece in chunk_text(rec["text"], p.chunk_size, p.chunk_overlap):
            chunks.append({"id": len(chunks), "doc": rec.get("_loc", str(doc)), "text": piece})
    if not chunks:
        from medpipe.errors import ConfigError

        raise ConfigError(f"rag.index: the corpus {p.index} has no text to index")
    with atomic_dir(directory) as tmp:
        with open(tmp / "chunks.jsonl", "w", encoding="utf-8") as f:
            for c in chunks:
                f.write(json.dumps(c, ensure_ascii=False) + "\n")
        embedder = None
        if p.retriever == "bm25":
            import bm25s

            retriever = bm25s.BM25()
            retriever.index([tokens(c["text"], p.tokenize) or ["\0"] for c in chunks], show_progress=False)
            retriever.save(str(tmp / "bm25"), show_progress=False)
        else:
            import faiss
            import numpy as np

            embedder = _embedder(p.embedding_model)
            emb = embedder.encode([c["text"] for c in chunks], normalize_embeddings=True, convert_to_numpy=True,
                                  batch_size=32, show_progress_bar=False).astype(np.float32)
            retriever = faiss.IndexFlatIP(emb.shape[1])
            retriever.add(emb)
            faiss.write_index(retriever, str(tmp / "dense.faiss"))
        meta = {"corpus": str(p.index), "corpus_fingerprint": corpus_fp, "options": opts, "chunks": len(chunks),
                "documents": len(loaded.records), "built": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json_atomic(tmp / "index.json", meta)
    say(f"RAG index: {len(chunks)} chunks from {len(loaded.records)} documents ({p.retriever}) "
        f"built in {time.monotonic() - t0:.1f}s → {directory}")
    if p.retriever == "bm25":
        import bm25s

        retriever = bm25s.BM25.load(str(directory / "bm25"), show_progress=False)
    return KnowledgeIndex(directory, chunks, meta, retriever, embedder)


PASSAGES_HEAD = {"zh": "参考资料：", "en": "Reference passages:"}


def passages_block(passages: list[dict], lang: str = "en") -> str:
    head = PASSAGES_HEAD.get(lang, PASSAGES_HEAD["en"])
    return head + "\n" + "\n".join(f"[{i + 1}] {c['text']}" for i, c in enumerate(passages))
