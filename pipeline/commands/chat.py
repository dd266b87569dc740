"""`medpipe chat` (interactive or one-shot) and the RAG glue chat and serve share."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from medpipe.errors import MedpipeError
from medpipe.stages.inference.runtime import LocalModel, OpenAIClient

from .rundir import stage_artifact


def chat_loop(run_dir: str, stage: str | None, message: str | None, rag: bool, rag_corpus: str | None,
              url: str | None, system: str | None, max_new_tokens: int, temperature: float,
              input_fn=input, print_fn=print, stream_to: Any = None, seed: int | None = None) -> None:
    """One-shot (`message`) or interactive chat with a stage's model (or an endpoint with `url`).
    Interactive commands: /reset (forget the dialogue), /exit. With `stream_to` (a text stream,
    e.g. sys.stdout) a local model's interactive answers are written there as they are decoded."""
    retriever = None
    if url:
        client = OpenAIClient(url)
        client.check()
        name = f"{client.model} @ {client.base}"

        def answer(msgs):
            return client.chat(msgs, max_tokens=max_new_tokens, temperature=temperature)
    else:
        stage_name, art = stage_artifact(run_dir, stage)
        model = LocalModel.from_artifact(art, name=stage_name)
        name = f"{stage_name} ({art.model_path})"

        def answer(msgs):
            kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
            if stream_to is None or message is not None:
                return model.chat(msgs, **kw).text
            stream_to.write("model> ")  # interactive terminal: the answer appears as it is decoded
            done = None
            for piece in model.stream(model.render(msgs), **kw):
                if isinstance(piece, str):
                    stream_to.write(piece)
                    stream_to.flush()
                else:
                    done = piece
            stream_to.write("\n")
            return done.text
    if rag:
        retriever = rag_retriever(run_dir, rag_corpus, say=lambda m: print_fn(m))
    history: list[dict] = [{"role": "system", "content": system}] if system else []

    def turn(text: str) -> str:
        msgs = history + [{"role": "user", "content": augment(text, retriever)}]
        reply = answer(msgs)
        history.extend([{"role": "user", "content": text}, {"role": "assistant", "content": reply}])
        return reply

    if message is not None:
        print_fn(turn(message))
        return
    print_fn(f"medpipe chat with {name}{' + RAG' if retriever else ''}. /reset clears the dialogue, /exit quits.")
    while True:
        try:
            text = input_fn("you> ")
        except (EOFError, KeyboardInterrupt):
            print_fn("")
            return
        if text.strip() in ("/exit", "/quit"):
            return
        if text.strip() == "/reset":
            del history[1 if system else 0:]
            continue
        if text.strip():
            reply = turn(text)
            if stream_to is None or url:
                print_fn(f"model> {reply}")


def rag_retriever(run_dir: str | None, corpus: str | None, say=print, k: int = 5):
    """A KnowledgeIndex for chat/serve: `corpus` (a data spec) or the run's first cpt stage's data."""
    from medpipe.stages.evaluation.rag import RagParams, build_or_load

    if corpus is None:
        corpus = run_corpus(run_dir)
    idx = build_or_load(RagParams(index=corpus, k=k), say=say)
    idx.k = k  # type: ignore[attr-defined]
    return idx


def run_corpus(run_dir: str | None) -> Any:
    """The pretraining corpus of a run: the corpus of its first stage whose kind declares one
    (`corpus_field` hook, cpt's `data`), read from config.yaml."""
    if run_dir is None:
        raise MedpipeError("--rag needs a corpus: give --rag-corpus PATH")
    import yaml

    cfg_path = Path(run_dir) / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
    from medpipe import registry

    for name, body in (cfg.get("stages") or {}).items():
        kind = body.get("kind") if isinstance(body, dict) else None
        field = registry.load(kind).corpus_field if kind in registry.kinds() else None
        if field and body.get(field):  # a kind that trains on a text corpus says which param holds it
            return body[field]
    raise MedpipeError(f"{run_dir} has no cpt stage whose corpus could be indexed; give --rag-corpus PATH")


def augment(text: str, retriever: Any) -> str:
    """The user's message with the top-k passages before it (RAG), or unchanged."""
    if retriever is None:
        return text
    from medpipe.data.lang import detect_lang
    from medpipe.stages.evaluation.rag import passages_block

    passages = retriever.search([text], getattr(retriever, "k", 5))[0]
    return passages_block(passages, detect_lang(text)) + "\n\n" + text
