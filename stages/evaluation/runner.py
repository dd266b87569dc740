"""The evaluation drivers: `evaluate` runs every set of an eval params object on one model and
writes per-item details; one driver per set kind (`eval_mcq`, `eval_generation`,
`eval_promptcblue`) and the MCQ explanation scores. The model is an eval backend
(medpipe.stages.inference.backends); prompts come from prompts.py (protocol `native`) or
the protocols package (harness protocols). Shapes of the records: medpipe.stages.eval's docstring."""
from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

from .prompts import cue_prompt, item_lang, pick_shots, ppl_shots_block, prompt_hash, with_context
from .sets import EvalSet, check_pool, plan_sets, read_pool, task_groups


def method_tag(p: Any, kind: str) -> str:
    """How a set was scored, short: `cue`, `ppl-5shot`, `lm-eval`, `opencompass-5shot`, `cue-chat`,
    `generate`. `medpipe eval` keys its results by set AND this, so scoring a set another way adds a
    result instead of replacing the first."""
    if kind != "mcq":
        return "generate"
    protocol = p.protocol
    tag = p.method if protocol == "native" else protocol
    if p.shots:
        tag += f"-{p.shots}shot"
    if p.chat and protocol == "native":
        tag += "-chat"
    return tag


def _warm_imports(sets: list[EvalSet]) -> None:
    """One-time imports (sklearn for the F1 scores, ~1 s) happen before any set's clock starts."""
    if any(s.kind in ("mcq", "promptcblue") for s in sets):
        import sklearn.metrics  # noqa: F401


def evaluate(p: Any, art: Any, out_dir: Path, data_opts: dict | None = None, say=print,
             model_opts: dict | None = None) -> tuple[dict, dict]:
    """Evaluate the model of artifact `art` on every set of `p` (EvalParams); per-item details are
    written to `out_dir/details/<set>.jsonl`. Returns (flat metrics, per-set results)."""
    from medpipe.stages.inference.backends import open_backend

    from .judge import judge_client

    sets = plan_sets(p, data_opts)
    on_error = p.on_error or (data_opts or {}).get("on_error") or "fail"
    client = None
    if p.judge.url and any(s.kind == "generation" for s in sets):
        if p.judge.template == "iimedgpt":
            from medpipe.errors import ConfigError

            raise ConfigError("eval: judge.template=iimedgpt is a pairwise prompt (medpipe compare); the eval stage "
                              "scores answers one by one: judge.template=medpipe or medcare")
        client = judge_client(p.judge)  # reached before any generation: an unreachable judge fails fast
        say(f"judge: {client.model} at {client.base}")
    pool = read_pool(p.fewshot_data, on_error) if p.shots and p.fewshot_data is not None else []
    check_pool(pool, p, sets)
    index = None
    if p.rag.index is not None:
        from .rag import build_or_load

        index = build_or_load(p.rag, say=say, data_opts=data_opts)
        say(f"RAG: {len(index.chunks)} chunks ({index.kind}), top-{p.rag.k} passages per prompt")
    _warm_imports(sets)
    merged = art.task_models if p.task_models else {}
    backend, backend_path = None, None
    metrics: dict = {}
    results: dict = {}
    details_dir = Path(out_dir) / "details"
    details_dir.mkdir(parents=True, exist_ok=True)
    for s in sets:
        # C-Poly artifacts carry one merged model per task: a set named after a task is scored by
        # its task's model (one model in memory at a time), the others by the artifact's model.
        path = merged.get(s.name) or art.model_path
        if path != backend_path:
            backend = None  # free the previous model before loading the next
            backend = open_backend(art if path == art.model_path else
                                   dataclasses.replace(art, model_path=path, tokenizer_path=path),
                                   p.backend, p.batch_size, p.max_length, model_opts)
            backend_path = path
        if s.name in merged:
            say(f"{s.name}: the model merged for task {s.name!r} ({path})")
        t0 = time.monotonic()
        if s.kind == "mcq":
            res, details = eval_mcq(s, p, backend, pool, index)
        elif s.kind == "generation":
            res, details = eval_generation(s, p, backend, index, client, say)
        else:
            res, details = eval_promptcblue(s, p, backend, index)
        res["seconds"] = round(time.monotonic() - t0, 2)
        res["method"] = method_tag(p, s.kind)
        if s.name in merged:
            res["task_model"] = path
        results[s.name] = res
        for k, v in res["metrics"].items():
            metrics[f"{s.name}/{k}"] = v
        with open(details_dir / f"{s.name}.jsonl", "w", encoding="utf-8") as f:
            for d in details:
                f.write(json.dumps(d, ensure_ascii=False, default=str) + "\n")
        shown = " ".join(f"{k}={v:.4g}" for k, v in res["metrics"].items() if isinstance(v, float))
        say(f"{s.name}: {shown} ({res['n']} items, {res['seconds']:.1f}s)")
    for group, tasks in task_groups(p).items():
        # lm-eval's group score (multimedqa.yaml: acc, mean, weight_by_size): the item-weighted mean
        n = sum(results[t]["n"] for t in tasks)
        metrics[f"{group}/acc"] = sum(results[t]["metrics"]["acc"] * results[t]["n"] for t in tasks) / n
        say(f"{group}: acc={metrics[f'{group}/acc']:.4g} ({n} items, {len(tasks)} tasks)")
    return metrics, results


def rag_contexts(index: Any, queries: list[str], k: int, langs: list[str]) -> list[str]:
    if index is None:
        return [""] * len(queries)
    from .rag import passages_block

    hits = index.search(queries, k)
    return [passages_block(h, lg) for h, lg in zip(hits, langs)]


def eval_mcq(s: EvalSet, p: Any, backend: Any, pool: list[dict], index: Any) -> tuple[dict, list]:
    """A multiple-choice set under p.protocol: `native` (medpipe's prompts, p.method) here, the
    harness protocols in the protocols package. Details per item: gold, pred, correct, every option's
    score (+ token count and character length where options are scored as text), prompt hash."""
    from .metrics import mcq_scores

    items = s.records
    langs = [item_lang(it, p.lang) for it in items]
    rag_ctx = rag_contexts(index, [str(it.get("question") or "") for it in items], p.rag.k, langs)
    protocol = p.protocol
    if protocol != "native":
        from .protocols import run_protocol

        details = run_protocol(protocol, s, p, backend, pool, rag_ctx)
    else:
        details = _native_mcq(items, p, backend, langs, rag_ctx, [pick_shots(it, pool, p.shots) for it in items])
    preds = []
    for d, it in zip(details, items):
        # a harness that decides correctness itself (MedCare's, CMExam's scorer) sets `correct`
        d.setdefault("correct", bool(d["pred"]) and sorted(d["pred"]) == sorted(it["answer"]))
        d.update(protocol=protocol, subject=it.get("subject"), _loc=it.get("_loc"))
        preds.append(d["pred"])
    sc = mcq_scores(items, preds)
    m = {"acc": sc["acc"], "f1_weighted": sc["f1_weighted"]}
    labeled = [d["correct"] for d, it in zip(details, items) if it.get("answer")]
    m["acc"] = sum(labeled) / len(labeled)  # = sc["acc"] unless the harness scores correctness its own way
    if "pred_norm" in details[0]:  # lm-eval's acc_norm: argmax of log-likelihood / option characters
        norm = [d["pred_norm"] == sorted(it["answer"]) for d, it in zip(details, items) if it.get("answer")]
        m["acc_norm"] = sum(norm) / len(norm)
    if any("invalid" in d for d in details):
        m["invalid"] = sc["invalid"]
    if p.explain:
        m.update(explanation_scores(s, p, backend, rag_ctx, details))
    res = {"kind": "mcq", "format": s.fmt, "protocol": protocol, "method": p.method if protocol == "native" else protocol,
           "shots": p.shots, "n": sc["n"], "metrics": m, "invalid": sc["invalid"], "unlabeled": sc["unlabeled"],
           "rag": index is not None}
    if "subjects" in sc:
        res["subjects"] = sc["subjects"]
    if "acc_multi" in sc:
        res["acc_multi"], res["n_multi"] = sc["acc_multi"], sc["n_multi"]
    return res, details


def _native_mcq(items: list[dict], p: Any, backend: Any, langs: list[str], rag_ctx: list[str],
                shots: list[list[dict]]) -> list[dict]:
    from .metrics import extract_letters
    from .prompts import TEMPLATES, build_ppl_prompt
    from .scoring import letter_scores, score_options_ppl

    special = not p.chat
    if p.method == "ppl":
        if backend.model is None:
            from medpipe.errors import ConfigError

            raise ConfigError("eval.method=ppl needs backend=transformers")
        aug = [with_context(it, "\n".join(x for x in (ppl_shots_block(ex, lg), rc) if x))
               for it, lg, rc, ex in zip(items, langs, rag_ctx, shots)]
        scored = score_options_ppl(aug, backend.model, backend.tok, batch_size=p.batch_size, reduction=p.reduction,
                                   lang=p.lang, chat=p.chat, max_length=p.max_length)
        out = []
        for it, a, r in zip(items, aug, scored):
            prompt, conts = build_ppl_prompt(a, p.lang, tok=backend.tok, chat=p.chat)
            out.append({"id": it.get("id"), "gold": it["answer"], "pred": [r["pred"]], "scores": r["scores"],
                        "n_tokens": r["n_tokens"], "chars": {k: len(c) for k, c in conts.items()},
                        "prompt_sha": prompt_hash(prompt)})
        return out
    prompts = [cue_prompt(with_context(it, rc), p.lang, ex, backend.tok, p.chat) for it, rc, ex in zip(items, rag_ctx, shots)]
    if p.method == "cue":
        scores = letter_scores(backend, prompts, [list(it["options"]) for it in items], special)
        return [{"id": it.get("id"), "gold": it["answer"], "pred": [max(sc, key=sc.get)], "scores": sc,
                 "n_tokens": {x: 1 for x in sc}, "chars": {x: len(x) for x in sc}, "prompt_sha": prompt_hash(pr)}
                for it, sc, pr in zip(items, scores, prompts)]
    if p.method == "generate_then_cue":  # MedCare's answering; correct = medpipe's exact letter set
        from .protocols import generate_then_cue

        return [{k: v for k, v in d.items() if k != "correct"}
                for d in generate_then_cue(items, p, backend, rag_ctx, langs)]
    texts = backend.generate(prompts, p.mcq_max_new_tokens, special)
    out = []
    for it, lg, text, pr in zip(items, langs, texts, prompts):
        letters, why = extract_letters(TEMPLATES[lg]["cue"] + text, it["options"])
        out.append({"id": it.get("id"), "gold": it["answer"], "pred": letters, "text": text, "invalid": why,
                    "prompt_sha": prompt_hash(pr)})
    return out


_EXPL_RE = re.compile(r"(?:解析|Explanation)\s*[:：]\s*")


def explanation_scores(s: EvalSet, p: Any, backend: Any, rag_ctx: list[str], details: list[dict]) -> dict:
    """BLEU/ROUGE of generated explanations against the items' reference explanations."""
    from medpipe.data import DataError
    from medpipe.data.render import mcq_prompt

    from .metrics import generation_scores

    idx = [i for i, it in enumerate(s.records) if str(it.get("explanation") or "").strip()]
    if not idx:
        raise DataError("explain=true but no item has an explanation to score against (no references)",
                        str(s.source.path) if s.source else s.name, None, "explanation", reason="no_reference")
    convs = [[{"role": "user", "content": (rag_ctx[i] + "\n\n" if rag_ctx[i] else "") + mcq_prompt(s.records[i])}]
             for i in idx]
    outs = backend.generate([backend.render(c) for c in convs], p.max_new_tokens, not backend.has_template)
    hyps = [(_EXPL_RE.split(o, maxsplit=1) + [""])[1] or o for o in outs]
    refs = [str(s.records[i]["explanation"]) for i in idx]
    for i, o in zip(idx, outs):
        details[i]["explanation_output"] = o
    return {f"expl_{k}": v for k, v in generation_scores(hyps, refs, tokenize=p.tokenize).items()}


def _gen_prompts(backend: Any, convs: list[list[dict]], index: Any, k: int, lang: str) -> list[str]:
    from medpipe.data.lang import detect_lang

    if index is not None:
        queries = [c[-1]["content"] for c in convs]
        langs = [detect_lang(q) if lang == "auto" else lang for q in queries]
        blocks = rag_contexts(index, queries, k, langs)
        convs = [c[:-1] + [{"role": "user", "content": f"{b}\n\n{c[-1]['content']}"}] for c, b in zip(convs, blocks)]
    return [backend.render(c) for c in convs]


def eval_generation(s: EvalSet, p: Any, backend: Any, index: Any, client: Any, say) -> tuple[dict, list]:
    from .judge import judge_pointwise
    from .metrics import generation_scores

    convs = [[{"role": m["role"], "content": m["content"]} for m in r["messages"][:-1]] for r in s.records]
    refs = [r["messages"][-1]["content"] for r in s.records]
    prompts = _gen_prompts(backend, convs, index, p.rag.k, p.lang)
    hyps = backend.generate(prompts, p.max_new_tokens, not backend.has_template)
    m = generation_scores(hyps, refs, tokenize=p.tokenize)
    details = [{"_loc": r.get("_loc"), "prompt": c[-1]["content"], "reference": ref, "output": h}
               for r, c, ref, h in zip(s.records, convs, refs, hyps)]
    res = {"kind": "generation", "format": s.fmt, "n": len(refs), "metrics": dict(m), "tokenize": p.tokenize,
           "rag": index is not None}
    if client is not None:
        n = len(refs) if p.judge.limit is None else min(len(refs), p.judge.limit)
        judged = judge_pointwise(client, convs[:n], hyps[:n], refs[:n], p.judge.max_tokens, p.judge.template)
        res["judge"] = judged["summary"]
        for a, v in judged["summary"]["means"].items():
            res["metrics"][f"judge_{a}"] = v
        res["metrics"]["judge_malformed"] = judged["summary"]["malformed"]
        for d, j in zip(details, judged["items"]):
            d["judge"] = j
        say(f"{s.name}: judge scored {judged['summary']['scored']}/{n}, malformed replies {judged['summary']['malformed']}")
    return res, details


def eval_promptcblue(s: EvalSet, p: Any, backend: Any, index: Any) -> tuple[dict, list]:
    from .cblue import promptcblue_scores

    convs = [[{"role": "user", "content": r["input"]}] for r in s.records]
    prompts = _gen_prompts(backend, convs, index, p.rag.k, p.lang)
    outs = backend.generate(prompts, p.max_new_tokens, not backend.has_template)
    sc = promptcblue_scores(s.records, outs)
    m = {"score": sc["score"]}
    for task, v in sc["tasks"].items():
        m[f"{task}_{v['metric']}"] = v["score"]
    details = [{"_loc": r.get("_loc"), "task_dataset": r.get("task_dataset"), "target": r["target"], "output": o}
               for r, o in zip(s.records, outs)]
    return {"kind": "promptcblue", "format": s.fmt, "n": len(outs), "metrics": m, "tasks": sc["tasks"],
            "rag": index is not None}, details
