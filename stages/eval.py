"""`eval` — evaluate the input model (the previous stage's output, or `from: <stage>`) on exam,
generation and PromptCBLUE sets; results land in the evaluated stage's row of the report.

Sets. `data` is one data spec or a list; every source is one eval set, named by its `task:`
(default: the mcq format name — cmexam, medqa, medmcqa, pubmedqa, ceval — or the file stem;
a `+rag` suffix when RAG is on). What a set is, follows its format:
* mcq formats → multiple-choice accuracy, three ways (`method`):
  - `ppl`: option perplexity (`medpipe.stages.evaluation.mcq.score_options_ppl`, mean NLL of the option
    tokens, `reduction: sum` optional); lowest wins.
  - `cue`: answer-cue letter logits (MedCare): the prompt lists the options and ends with
    "The answer is" / "答案为"; the valid letter with the highest next-token logit wins.
  - `generate`: greedy generation after the same cue (`mcq_max_new_tokens`), letters extracted
    (`medpipe.stages.evaluation.metrics.extract_letters`); a multi-answer item needs every gold letter and
    no other; an unknown letter is an invalid prediction, counted, not guessed.
  Metrics: `acc`, `f1_weighted` (Qilin-Med / CMExam), `invalid`, per-subject accuracy (details).
  `explain: true` also generates each item's answer with its explanation (the prompt as the data
  layer renders mcq items for SFT, through the chat template) and scores the text after
  "解析：" / "Explanation:" (or the whole answer) against the item's explanation: `expl_bleu1` …
  `expl_rougeL` (Qilin-Med's CMExam explanation scores); items without an explanation are skipped.
  `shots: k` prepends k solved examples from `fewshot_data` (same subject first, then same set,
  file order; an example equal to the item is skipped), greedy, as C-Eval is reported. For `ppl`
  the examples go in the item's context.
* chat formats (alpaca, sharegpt, messages, huatuo QA) → generation: the conversation up to the
  last assistant turn is the prompt (chat template when the tokenizer has one), that turn is the
  reference; BLEU-1/4, ROUGE-1/2/L (`tokenize: char | jieba`, see metrics.py). With
  `judge.url`, an LLM judge also scores each answer 1–5 on fluency, relevance, completeness,
  proficiency (MedCare); malformed judge replies are counted (`judge_malformed`), not scored.
* promptcblue → generation, scored per task as the PromptCBLUE benchmark does (`score` = mean).

C-Poly artifacts (`task_models`: one merged model per task): a set named after a task is
scored with that task's model (`task_models: false` scores every set with the artifact's model);
the set's result records it as `task_model`.

`rag: {index: <corpus>, k: 5}` prepends the top-k passages of a knowledge index built from the
corpus (stages/rag.py) to every prompt: in the item's context for mcq, before the user's message
for generation.

Records (the shapes the report reads):
* the eval stage's artifact: `kind: eval`, the input model passed through unchanged (model_path,
  format) so a later stage may train on it, `metrics` = flat `{"<set>/<metric>": number}`,
  `evaluated_stage` = the stage whose model was evaluated (the input artifact's stage;
  "base" for the recipe's model), `results` = per set {kind, n, metrics, subjects,
  judge...}, per-item predictions in `<stage dir>/details/<set>.jsonl`.
* `medpipe eval RUN_DIR --stage S key=value...` writes the same into `<run_dir>/eval/<S>.json`:
  `{"stage", "evaluated_stage", "model_path", "params", "metrics", "results", "updated"}`;
  a later `medpipe eval` of the same stage merges its sets in (same keys replaced).

Backends: `transformers` (default, batched, padding-aware: prompts sorted by length, left
padding, `batch_size` at a time) or `vllm` (GPU machines with vLLM installed; generation and
cue scoring; prompts go to vLLM as token ids tokenised as above; a letter's score there is its
log-probability after the prompt, from vLLM's prompt logprobs of prompt + letter, all items in
one batched call). The vLLM path is tested against a stand-in engine here (no vLLM on CPU).
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from medpipe.stages.evaluation.judge import JudgeParams, judge_client, judge_pointwise
from medpipe.stages.evaluation.rag import RagParams

METHODS = ("ppl", "cue", "generate")
BACKENDS = ("transformers", "vllm")
MCQ_FORMATS = ("cmexam", "medqa", "medmcqa", "pubmedqa", "ceval")
GEN_FORMATS = ("alpaca", "sharegpt", "messages", "huatuo")


@dataclass
class EvalParams:
    data: Any = None  # eval sets: path | conf/data name | source dict | list (one set per source)
    method: str = "cue"  # multiple choice: ppl | cue | generate
    shots: int = 0  # k-shot examples from fewshot_data
    task_models: bool = True  # C-Poly artifacts: a set named after a task uses that task's merged model
    fewshot_data: Any = None  # dev split for k-shot prompting
    lang: str = "auto"  # prompt language: auto (per item) | en | zh
    chat: bool = False  # render mcq prompts through the chat template
    reduction: str = "mean"  # ppl: mean | sum NLL of the option tokens
    tokenize: str = "char"  # BLEU/ROUGE tokens: char | jieba
    max_new_tokens: int = 128  # generation sets
    mcq_max_new_tokens: int = 8  # method=generate
    explain: bool = False  # mcq sets: also generate answer + explanation, BLEU/ROUGE vs the reference explanation
    batch_size: int = 16  # prompts per forward / generate call (sorted by length, padded); raise on a GPU
    max_length: Optional[int] = None  # prompt tokens kept (from the left); null = all
    limit: Optional[int] = None  # first N items of every set
    backend: str = "transformers"  # transformers | vllm
    on_error: Optional[str] = None  # fail | skip; default: the recipe's data.on_error
    rag: RagParams = field(default_factory=RagParams)
    judge: JudgeParams = field(default_factory=JudgeParams)


class EvalStage:
    """Evaluate the input model: exam accuracy (ppl | cue | generate), BLEU/ROUGE, PromptCBLUE, judge."""

    Params = EvalParams
    trains = False
    evaluates = True  # hook: results join the evaluated stage's row in reports; not a model to chat with

    def check(self, params: EvalParams, base: Any, data_opts: dict) -> list[str]:
        sets = plan_sets(params, data_opts)
        validate_params(params)
        return [f"eval set {s.name}: {s.kind} ({s.fmt}, {len(s.records)} items)" for s in sets]

    def run(self, ctx: Any):
        from medpipe.artifact import Artifact

        p: EvalParams = ctx.params
        evaluated = ctx.input.stage
        ctx.say(f"evaluating {evaluated} ({ctx.input.model_path})")
        metrics, results = evaluate(p, ctx.input, ctx.output_dir, ctx.data, ctx.say, ctx.model)
        # the input model passes through, so a stage after an eval trains on the evaluated model
        return Artifact(stage=ctx.name, kind=ctx.kind, format=ctx.input.format, model_path=ctx.input.model_path,
                        tokenizer_path=ctx.input.tokenizer_path, base_model_path=ctx.input.base_model_path,
                        merged_path=ctx.input.merged_path, trust_remote_code=ctx.input.trust_remote_code,
                        metrics=metrics, evaluated_stage=evaluated, results=results)


# --- sets ---------------------------------------------------------------------------------------
@dataclass
class EvalSet:
    name: str
    kind: str  # mcq | generation | promptcblue
    fmt: str
    records: list
    source: Any = None


def validate_params(p: EvalParams) -> None:
    from medpipe.errors import ConfigError

    if p.method not in METHODS:
        raise ConfigError(f"eval.method must be one of {', '.join(METHODS)}, got '{p.method}'")
    if p.backend not in BACKENDS:
        raise ConfigError(f"eval.backend must be one of {', '.join(BACKENDS)}, got '{p.backend}'")
    if p.tokenize not in ("char", "jieba"):
        raise ConfigError(f"eval.tokenize must be 'char' or 'jieba', got '{p.tokenize}'")
    if p.shots < 0:
        raise ConfigError("eval.shots must be >= 0")
    if p.shots and p.fewshot_data is None:
        raise ConfigError(f"eval.shots={p.shots} needs fewshot_data (the dev split the examples come from)")
    if p.reduction not in ("mean", "sum"):
        raise ConfigError(f"eval.reduction must be 'mean' or 'sum', got '{p.reduction}'")


def _source_format(src: Any) -> str:
    from medpipe.data import detect_format
    from medpipe.data.sources import expand_paths

    if src.format and src.format != "auto":
        from medpipe.data.formats import FORMAT_ALIASES

        return FORMAT_ALIASES.get(src.format, src.format)
    return detect_format(expand_paths(src)[0], src.columns)[0]


def plan_sets(p: EvalParams, data_opts: dict | None = None) -> list[EvalSet]:
    """Read and validate every eval set (records in file order, `limit` applied)."""
    from medpipe.errors import ConfigError
    from medpipe.data import DataError, parse_spec
    from medpipe.data.validate import read_source

    if p.data is None:
        raise ConfigError("eval: `data` is required (one eval set per source: mcq, chat or PromptCBLUE data)")
    on_error = p.on_error or (data_opts or {}).get("on_error") or "fail"
    sets: list[EvalSet] = []
    seen: dict[str, int] = {}
    suffix = "+rag" if p.rag.index is not None else ""
    for src in parse_spec(p.data):
        fmt = _source_format(src)
        if fmt in MCQ_FORMATS:
            kind, want = "mcq", "mcq"
        elif fmt == "promptcblue":
            kind, want = "promptcblue", "chat"
        elif fmt in GEN_FORMATS:
            kind, want = "generation", "chat"
        else:
            raise DataError(f"format '{fmt}' cannot be evaluated (mcq: {', '.join(MCQ_FORMATS)}; generation: "
                            f"{', '.join(GEN_FORMATS)}; promptcblue)", src.path, None, "format", reason="format")
        if kind == "promptcblue":
            records = read_promptcblue(src, on_error)
        else:
            records, _ = read_source(src, want, on_error)
        if p.limit:
            records = records[: p.limit]
        if not records:
            raise DataError("no records to evaluate", src.path, None, None, reason="empty_dataset")
        if kind == "generation":
            for r in records:
                msgs = r["messages"]
                if msgs[-1]["role"] != "assistant" or not str(msgs[-1]["content"]).strip():
                    raise DataError("no reference answer: a generation eval set needs each conversation to end "
                                    "with a non-empty assistant turn", r.get("_loc", src.path), None, "messages",
                                    reason="no_reference")
        if kind == "mcq" and not any(r.get("answer") for r in records):
            raise DataError("no reference answers: every item is unlabeled, accuracy cannot be computed",
                            src.path, None, "answer", reason="no_reference")
        name = src.task or (fmt if kind == "mcq" else Path(src.path).stem)
        name = re.sub(r"[^\w.+-]+", "_", name) + suffix
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}-{seen[name]}"
        sets.append(EvalSet(name, kind, fmt, records, src))
    return sets


def read_promptcblue(src: Any, on_error: str) -> list[dict]:
    """Raw PromptCBLUE rows (input, target, answer_choices, task_type, task_dataset, sample_id),
    validated through the data layer first (so errors name path:line)."""
    from medpipe.data.readers import RawReader
    from medpipe.data.sources import expand_paths
    from medpipe.data.validate import read_source

    read_source(src, "chat", on_error)  # validation only
    rows = []
    for path in expand_paths(src):
        reader = RawReader(path, on_error)
        for line, raw in reader:
            if not isinstance(raw, dict) or not str(raw.get("input") or "").strip() or raw.get("target") is None:
                continue
            rows.append({**raw, "_loc": f"{path}:{line}"})
            if src.limit and len(rows) >= src.limit:
                return rows
    return rows


# --- prompts ------------------------------------------------------------------------------------
def _lang(item: dict, lang: str) -> str:
    from medpipe.stages.evaluation.mcq import detect_lang

    return detect_lang(str(item.get("question") or "")) if lang == "auto" else lang


def _fields(item: dict, lg: str) -> dict:
    from medpipe.stages.evaluation.mcq import TEMPLATES

    t = TEMPLATES[lg]
    ctx = item.get("context")
    opts = item["options"]
    return {"context": t["context"].format(context=ctx) if ctx else "", "question": str(item.get("question") or ""),
            "options": "\n".join(t["option_line"].format(letter=k, option=v) for k, v in opts.items())}


def cue_prompt(item: dict, lang: str, shots: list[dict], tok: Any = None, chat: bool = False) -> str:
    """Answer-cue prompt: k solved examples, then the item, ending with the cue."""
    from medpipe.stages.evaluation.mcq import TEMPLATES

    lg = _lang(item, lang)
    t = TEMPLATES[lg]
    sep = " " if lg == "en" else ""
    if chat:
        msgs = []
        for ex in shots:
            msgs += [{"role": "user", "content": t["cue_body"].format(**_fields(ex, lg)).rstrip("\n")},
                     {"role": "assistant", "content": f"{t['cue']}{sep}{''.join(ex['answer'])}"}]
        msgs.append({"role": "user", "content": t["cue_body"].format(**_fields(item, lg)).rstrip("\n")})
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + t["cue"]
    parts = [t["cue_body"].format(**_fields(ex, lg)) + t["cue"] + sep + "".join(ex["answer"]) + "\n\n" for ex in shots]
    return "".join(parts) + t["cue_body"].format(**_fields(item, lg)) + t["cue"]


def pick_shots(item: dict, pool: list[dict], k: int) -> list[dict]:
    """k examples: same subject first, then same task, then any; file order; never the item itself."""
    if k <= 0 or not pool:
        return []
    key = (item.get("question"), tuple(sorted(item.get("options", {}).items())))
    pool = [e for e in pool if e.get("answer") and (e.get("question"), tuple(sorted(e["options"].items()))) != key]
    same_subj = [e for e in pool if item.get("subject") and e.get("subject") == item.get("subject")]
    same_task = [e for e in pool if e.get("task") == item.get("task") and e not in same_subj]
    rest = [e for e in pool if e not in same_subj and e not in same_task]
    return (same_subj + same_task + rest)[:k]


def _with_context(item: dict, extra: str) -> dict:
    if not extra:
        return item
    ctx = item.get("context")
    return {**item, "context": f"{extra}\n{ctx}" if ctx else extra}


# --- scoring ------------------------------------------------------------------------------------
def encode_prompts(tok: Any, prompts: list[str], add_special_tokens: bool, max_length: int | None) -> list[list[int]]:
    """Token ids of every prompt, cut from the left to max_length: what both backends score.
    One batch call: the fast tokenizer encodes the list in parallel (per-prompt calls cost ~10 %)."""
    enc = tok(list(prompts), add_special_tokens=add_special_tokens)["input_ids"] if prompts else []
    return [list(e)[-max_length:] if max_length else list(e) for e in enc]


def letter_logits(model: Any, tok: Any, prompts: list[str], letters: list[list[str]], batch_size: int = 16,
                  max_length: int | None = None, add_special_tokens: bool = True,
                  share_prefix: bool = True) -> list[dict[str, float]]:
    """Next-token logit of every valid letter after each prompt (batched: sorted by length, left
    padding, explicit position ids, logits for the last position only; a prefix shared by many
    prompts, such as k-shot examples, computed once: medpipe.stages.inference.prefix)."""
    from medpipe.stages.evaluation.mcq import letter_token_ids
    from medpipe.stages.inference.prefix import last_token_logits

    cand = letter_token_ids(tok, sorted({x for ls in letters for x in ls}))
    enc = encode_prompts(tok, prompts, add_special_tokens, max_length)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out: list[dict | None] = [None] * len(prompts)
    cols = sorted({i for ids in cand.values() for i in ids})
    where = {x: [cols.index(i) for i in ids] for x, ids in cand.items()}
    for rows, logits in last_token_logits(model, enc, batch_size, pad, share_prefix):
        sub = logits[:, cols].tolist()  # the candidate letters' logits, one copy per batch
        for r, k in enumerate(rows):
            out[k] = {x: max(sub[r][j] for j in where[x]) for x in letters[k]}
    return out  # type: ignore[return-value]


class _Runner:
    """The model behind an evaluation: transformers (default) or vLLM."""

    def __init__(self, art: Any, p: EvalParams, model_opts: dict | None = None):
        self.p = p
        self.backend = p.backend
        trust = art.trust_remote_code or bool((model_opts or {}).get("trust_remote_code"))
        if self.backend == "vllm":
            try:
                from vllm import LLM
            except ImportError:
                from medpipe.errors import ConfigError

                raise ConfigError("eval.backend=vllm but vLLM is not installed (pip install vllm on a GPU machine); "
                                  "use backend=transformers") from None
            from transformers import AutoTokenizer

            self.llm = LLM(model=art.model_path, tokenizer=art.tokenizer_path, trust_remote_code=trust)
            self.tok = AutoTokenizer.from_pretrained(art.tokenizer_path, trust_remote_code=trust)
            self.local = None
        else:
            from medpipe.stages.inference.runtime import LocalModel

            self.local = LocalModel.from_artifact(art)
            self.tok = self.local.tok

    @property
    def has_template(self) -> bool:
        return bool(getattr(self.tok, "chat_template", None))

    def render(self, messages: list[dict]) -> str:
        if self.local is not None:
            return self.local.render(messages)
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(self, prompts: list[str], max_new_tokens: int, add_special_tokens: bool) -> list[str]:
        if self.local is not None:
            return [c.text for c in self.local.generate(prompts, max_new_tokens=max_new_tokens,
                                                         batch_size=self.p.batch_size, max_length=self.p.max_length,
                                                         add_special_tokens=add_special_tokens)]
        from vllm import SamplingParams

        outs = self.llm.generate(self._token_prompts(prompts, add_special_tokens),
                                 SamplingParams(temperature=0.0, max_tokens=max_new_tokens))
        return [o.outputs[0].text.strip() for o in outs]

    def _token_prompts(self, prompts: list[str], add_special_tokens: bool) -> list[dict]:
        """vLLM prompts as token ids (vLLM's TokensPrompt shape), tokenised as the transformers
        backend does."""
        return [{"prompt_token_ids": e} for e in encode_prompts(self.tok, prompts, add_special_tokens, self.p.max_length)]

    def letters(self, prompts: list[str], letters: list[list[str]], add_special_tokens: bool) -> list[dict]:
        if self.local is not None:
            return letter_logits(self.local.model, self.tok, prompts, letters, self.p.batch_size, self.p.max_length,
                                 add_special_tokens)
        from vllm import SamplingParams

        from medpipe.stages.evaluation.mcq import letter_token_ids

        # Each (item, letter token) is the prompt + that token, scored by its prompt logprob: the
        # letter's log-probability after the prompt, exact for every candidate (a top-N logprobs
        # list may not contain them). One generate call: vLLM batches the requests and its prefix
        # cache computes each prompt once.
        cand = letter_token_ids(self.tok, sorted({x for ls in letters for x in ls}))
        base = self._token_prompts(prompts, add_special_tokens)
        reqs, keys = [], []
        for k, (bp, ls) in enumerate(zip(base, letters)):
            for x in ls:
                for t in cand[x]:
                    reqs.append({"prompt_token_ids": bp["prompt_token_ids"] + [t]})
                    keys.append((k, x, t))
        outs = self.llm.generate(reqs, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))
        out: list[dict] = [{x: float("-inf") for x in ls} for ls in letters]
        for (k, x, t), o in zip(keys, outs):
            out[k][x] = max(out[k][x], float(o.prompt_logprobs[-1][t].logprob))
        return out


# --- evaluation ---------------------------------------------------------------------------------
def evaluate(p: EvalParams, art: Any, out_dir: Path, data_opts: dict | None = None, say=print,
             model_opts: dict | None = None) -> tuple[dict, dict]:
    """Evaluate the model of artifact `art` on every set of `p`; per-item details are written to
    `out_dir/details/<set>.jsonl`. Returns (flat metrics, per-set results)."""
    validate_params(p)
    sets = plan_sets(p, data_opts)
    client = None
    if p.judge.url and any(s.kind == "generation" for s in sets):
        client = judge_client(p.judge)  # reached before any generation: an unreachable judge fails fast
        say(f"judge: {client.model} at {client.base}")
    pool: list[dict] = []
    if p.shots:
        from medpipe.data.validate import read_source
        from medpipe.data import parse_spec

        for src in parse_spec(p.fewshot_data):
            pool += read_source(src, "mcq", p.on_error or (data_opts or {}).get("on_error") or "fail")[0]
    index = None
    if p.rag.index is not None:
        from medpipe.stages.evaluation.rag import build_or_load

        index = build_or_load(p.rag, say=say, data_opts=data_opts)
        say(f"RAG: {len(index.chunks)} chunks ({index.kind}), top-{p.rag.k} passages per prompt")
    merged = art.task_models if p.task_models else {}
    runner, runner_path = None, None
    metrics: dict = {}
    results: dict = {}
    details_dir = Path(out_dir) / "details"
    details_dir.mkdir(parents=True, exist_ok=True)
    for s in sets:
        # C-Poly artifacts carry one merged model per task: a set named after a task is scored by
        # its task's model (one model in memory at a time), the others by the artifact's model.
        path = merged.get(s.name) or art.model_path
        if path != runner_path:
            runner = None  # free the previous model before loading the next
            runner = _Runner(art if path == art.model_path else
                             dataclasses.replace(art, model_path=path, tokenizer_path=path), p, model_opts)
            runner_path = path
        if s.name in merged:
            say(f"{s.name}: the model merged for task {s.name!r} ({path})")
        t0 = time.monotonic()
        if s.kind == "mcq":
            res, details = eval_mcq(s, p, runner, pool, index)
        elif s.kind == "generation":
            res, details = eval_generation(s, p, runner, index, client, say)
        else:
            res, details = eval_promptcblue(s, p, runner, index)
        res["seconds"] = round(time.monotonic() - t0, 2)
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
    return metrics, results


def _rag_contexts(index: Any, queries: list[str], k: int, langs: list[str]) -> list[str]:
    if index is None:
        return [""] * len(queries)
    from medpipe.stages.evaluation.rag import passages_block

    hits = index.search(queries, k)
    return [passages_block(h, lg) for h, lg in zip(hits, langs)]


def eval_mcq(s: EvalSet, p: EvalParams, runner: _Runner, pool: list[dict], index: Any) -> tuple[dict, list]:
    from medpipe.stages.evaluation.metrics import extract_letters, mcq_scores

    items = s.records
    langs = [_lang(it, p.lang) for it in items]
    rag_ctx = _rag_contexts(index, [str(it.get("question") or "") for it in items], p.rag.k, langs)
    shots = [pick_shots(it, pool, p.shots) for it in items]
    special = not p.chat
    details = []
    if p.method == "ppl":
        from medpipe.stages.evaluation.mcq import TEMPLATES, score_options_ppl

        if runner.local is None:
            from medpipe.errors import ConfigError

            raise ConfigError("eval.method=ppl needs backend=transformers")
        aug = []
        for it, lg, rc, ex in zip(items, langs, rag_ctx, shots):
            t = TEMPLATES[lg]
            block = "\n".join(t["ppl_body"].format(context="", question=e["question"]) + t["ppl_prefix"]
                              + t["ppl_option"].format(option=e["options"][e["answer"][0]]) for e in ex)
            aug.append(_with_context(it, "\n".join(x for x in (block, rc) if x)))
        scored = score_options_ppl(aug, runner.local.model, runner.tok, batch_size=p.batch_size, reduction=p.reduction,
                                   lang=p.lang, chat=p.chat, max_length=p.max_length)
        preds = [[r["pred"]] for r in scored]
        for it, r in zip(items, scored):
            details.append({"id": it.get("id"), "gold": it["answer"], "pred": [r["pred"]], "scores": r["scores"]})
    else:
        tok = runner.tok
        prompts = [cue_prompt(_with_context(it, rc), p.lang, ex, tok, p.chat) for it, rc, ex in zip(items, rag_ctx, shots)]
        if p.method == "cue":
            scores = runner.letters(prompts, [list(it["options"]) for it in items], special)
            preds = [[max(sc, key=sc.get)] for sc in scores]
            for it, sc, pr in zip(items, scores, preds):
                details.append({"id": it.get("id"), "gold": it["answer"], "pred": pr, "scores": sc})
        else:
            texts = runner.generate(prompts, p.mcq_max_new_tokens, special)
            preds = []
            for it, lg, text in zip(items, langs, texts):
                from medpipe.stages.evaluation.mcq import TEMPLATES

                letters, why = extract_letters(TEMPLATES[lg]["cue"] + text, it["options"])
                preds.append(letters)
                details.append({"id": it.get("id"), "gold": it["answer"], "pred": letters, "text": text, "invalid": why})
    for d, it in zip(details, items):
        d["correct"] = sorted(d["pred"] or []) == sorted(it["answer"]) if d["pred"] else False
        d["subject"] = it.get("subject")
        d["_loc"] = it.get("_loc")
    sc = mcq_scores(items, preds)
    m = {"acc": sc["acc"], "f1_weighted": sc["f1_weighted"]}
    if p.method == "generate":
        m["invalid"] = sc["invalid"]
    if p.explain:
        m.update(explanation_scores(s, p, runner, rag_ctx, details))
    res = {"kind": "mcq", "format": s.fmt, "method": p.method, "shots": p.shots, "n": sc["n"], "metrics": m,
           "invalid": sc["invalid"], "unlabeled": sc["unlabeled"], "rag": index is not None}
    if "subjects" in sc:
        res["subjects"] = sc["subjects"]
    if "acc_multi" in sc:
        res["acc_multi"], res["n_multi"] = sc["acc_multi"], sc["n_multi"]
    return res, details


_EXPL_RE = re.compile(r"(?:解析|Explanation)\s*[:：]\s*")


def explanation_scores(s: EvalSet, p: EvalParams, runner: _Runner, rag_ctx: list[str], details: list[dict]) -> dict:
    """BLEU/ROUGE of generated explanations against the items' reference explanations."""
    from medpipe.data import DataError
    from medpipe.data.render import mcq_prompt
    from medpipe.stages.evaluation.metrics import generation_scores

    idx = [i for i, it in enumerate(s.records) if str(it.get("explanation") or "").strip()]
    if not idx:
        raise DataError("explain=true but no item has an explanation to score against (no references)",
                        str(s.source.path) if s.source else s.name, None, "explanation", reason="no_reference")
    convs = [[{"role": "user", "content": (rag_ctx[i] + "\n\n" if rag_ctx[i] else "") + mcq_prompt(s.records[i])}]
             for i in idx]
    outs = runner.generate([runner.render(c) for c in convs], p.max_new_tokens, not runner.has_template)
    hyps = [(_EXPL_RE.split(o, maxsplit=1) + [""])[1] or o for o in outs]
    refs = [str(s.records[i]["explanation"]) for i in idx]
    for i, o in zip(idx, outs):
        details[i]["explanation_output"] = o
    return {f"expl_{k}": v for k, v in generation_scores(hyps, refs, tokenize=p.tokenize).items()}


def _gen_prompts(runner: _Runner, convs: list[list[dict]], index: Any, k: int, lang: str) -> list[str]:
    from medpipe.stages.evaluation.mcq import detect_lang

    if index is not None:
        queries = [c[-1]["content"] for c in convs]
        langs = [detect_lang(q) if lang == "auto" else lang for q in queries]
        blocks = _rag_contexts(index, queries, k, langs)
        convs = [c[:-1] + [{"role": "user", "content": f"{b}\n\n{c[-1]['content']}"}] for c, b in zip(convs, blocks)]
    return [runner.render(c) for c in convs]


def eval_generation(s: EvalSet, p: EvalParams, runner: _Runner, index: Any, client: Any, say) -> tuple[dict, list]:
    from medpipe.stages.evaluation.metrics import generation_scores

    convs = [[{"role": m["role"], "content": m["content"]} for m in r["messages"][:-1]] for r in s.records]
    refs = [r["messages"][-1]["content"] for r in s.records]
    prompts = _gen_prompts(runner, convs, index, p.rag.k, p.lang)
    hyps = runner.generate(prompts, p.max_new_tokens, not runner.has_template)
    m = generation_scores(hyps, refs, tokenize=p.tokenize)
    details = [{"_loc": r.get("_loc"), "prompt": c[-1]["content"], "reference": ref, "output": h}
               for r, c, ref, h in zip(s.records, convs, refs, hyps)]
    res = {"kind": "generation", "format": s.fmt, "n": len(refs), "metrics": dict(m), "tokenize": p.tokenize,
           "rag": index is not None}
    if client is not None:
        n = len(refs) if p.judge.limit is None else min(len(refs), p.judge.limit)
        judged = judge_pointwise(client, convs[:n], hyps[:n], refs[:n], p.judge.max_tokens)
        res["judge"] = judged["summary"]
        for a, v in judged["summary"]["means"].items():
            res["metrics"][f"judge_{a}"] = v
        res["metrics"]["judge_malformed"] = judged["summary"]["malformed"]
        for d, j in zip(details, judged["items"]):
            d["judge"] = j
        say(f"{s.name}: judge scored {judged['summary']['scored']}/{n}, malformed replies {judged['summary']['malformed']}")
    return res, details


def eval_promptcblue(s: EvalSet, p: EvalParams, runner: _Runner, index: Any) -> tuple[dict, list]:
    from medpipe.stages.evaluation.metrics import promptcblue_scores

    convs = [[{"role": "user", "content": r["input"]}] for r in s.records]
    prompts = _gen_prompts(runner, convs, index, p.rag.k, p.lang)
    outs = runner.generate(prompts, p.max_new_tokens, not runner.has_template)
    sc = promptcblue_scores(s.records, outs)
    m = {"score": sc["score"]}
    for task, v in sc["tasks"].items():
        m[f"{task}_{v['metric']}"] = v["score"]
    details = [{"_loc": r.get("_loc"), "task_dataset": r.get("task_dataset"), "target": r["target"], "output": o}
               for r, o in zip(s.records, outs)]
    return {"kind": "promptcblue", "format": s.fmt, "n": len(outs), "metrics": m, "tasks": sc["tasks"],
            "rag": index is not None}, details
