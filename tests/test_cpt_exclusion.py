"""CPT can drop pretraining documents that overlap an eval set (AntGLM removed the PQA-L abstracts)."""
from __future__ import annotations

import json
from types import SimpleNamespace

from medpipe.stages.cpt import drop_eval_overlap
from medpipe.data import load_records
from medpipe.stages.models.tiny import corpus_files


def test_planted_eval_abstracts_are_dropped_and_others_kept(tmp_path):
    pubmedqa = next(p for p in corpus_files() if p.name == "pubmedqa.json")
    items = json.loads(pubmedqa.read_text())
    leaked = list(items.values())[:2]
    docs = [{"text": f"Unrelated medical note number {i} about hydration and rest."} for i in range(5)]
    for item in leaked:
        passage = "\n".join(["\n".join(item["CONTEXTS"]), item["LONG_ANSWER"]])
        docs.append({"text": passage})  # exact copy
        docs.append({"text": passage.replace(".", " .", 1)})  # near copy
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    records = load_records(str(corpus), "text").records
    params = SimpleNamespace(exclude_data={"path": str(pubmedqa), "format": "pubmedqa"}, on_error=None)
    kept, dropped = drop_eval_overlap(records, params, {})
    assert dropped == 4 and len(kept) == 5
    assert all(d["text"].startswith("Unrelated") for d in kept)
