"""`eval` — evaluate the input model (the previous stage's output, or `from: <stage>`) on exam,
generation and PromptCBLUE sets; results land in the evaluated stage's row of the report.

Sets. `data` is one data spec or a list; every source is one eval set, named by its `task:`
(default: the mcq format name — cmexam, medqa, medmcqa, pubmedqa, ceval — or the file stem;
a `+rag` suffix when RAG is on). What a set is, follows its format:
* mcq formats → multiple-choice accuracy, three ways (`method`):
  - `ppl`: option perplexity (`medpipe.stages.evaluation.scoring.score_options_ppl`, mean NLL of the option
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

Protocols (`protocol`, multiple-choice sets; stages/evaluation/protocols/ cites each harness file):
* `native` (default): medpipe's prompts and the `method` above (plus `generate_then_cue`: MedCare's
  free answer in the chat template, then the cue "The answer is" / "答案为" and one letter);
* `lm-eval`: lm-evaluation-harness 0.4.13's task prompts and log-likelihood scoring (medqa →
  medqa_4options, medmcqa, pubmedqa, ceval → ceval-valid_<subject>), `acc` and `acc_norm`; lm-eval
  task names (`data=medqa_4options`, `medmcqa`, `pubmedqa`, `multimedqa`) find the published files
  under `data_dir`; `shots` from `fewshot_data` drawn as lm-eval draws them;
* `opencompass`: OpenCompass gen configs (MedQA, MedMCQA, C-Eval; `chat` picks base- or chat-model
  rendering) and their answer extraction, exact match;
* `medcare`: generate-then-cue scored by the authors' exact-match regexes (eval_em.py);
* `cmexam`: CMExam's prompt, 4-beam inference and its scorer (letter or option text, exact set,
  "无答案" wrong and counted as `invalid`).
Per-item details carry `protocol`, `prompt_sha` (sha256 of the prompt, 16 hex), `correct`, and for
scored options every option's `scores`, `n_tokens` and `chars` (any normalisation can be
recomputed); generating protocols keep the `text`. A set's `seconds` excludes one-time imports.

C-Poly artifacts (`task_models`: one merged model per task): a set named after a task is
scored with that task's model (`task_models: false` scores every set with the artifact's model);
the set's result records it as `task_model`.

`rag: {index: <corpus>, k: 5}` prepends the top-k passages of a knowledge index built from the
corpus (stages/evaluation/rag.py) to every prompt: in the item's context for mcq, before the user's message
for generation.

Judge stages. `needs_judge: true` (MedCare's CCTE) and `pairwise: true` (IIMedGPT Fig. 5: the
input model against the model its adapter was trained on — after vs before DPO — win / tie / lose
and each side's mean response length, stages/evaluation/pairwise.py) need `judge.url`; without one
the stage says "skipped: no judge endpoint configured ..." and records no metrics; the run goes on.

Held-out figures (`heldout: {text, chat, preference}`, stages/evaluation/heldout.py): perplexity
of held-out documents, the last answer's NLL on held-out conversations, log p(chosen) >
log p(rejected) on held-out pairs — scores any model has, random or trained (the tiny profiles).

Records (the shapes the report reads):
* the eval stage's artifact: `kind: eval`, the input model passed through unchanged (model_path,
  format) so a later stage may train on it, `metrics` = flat `{"<set>/<metric>": number}`,
  `evaluated_stage` = the stage whose model was evaluated (the input artifact's stage;
  "base" for the recipe's model), `results` = per set {kind, n, metrics, subjects,
  judge...}, per-item predictions in `<stage dir>/details/<set>.jsonl`.
* `medpipe eval RUN_DIR --stage S key=value...` writes the same into `<run_dir>/eval/<S>.json`:
  `{"stage", "evaluated_stage", "model_path", "params", "metrics", "results", "updated"}`;
  results and metrics keyed by set and method (`cmexam@cue`, `cmexam@ppl-5shot`, `pubmedqa@lm-eval`;
  runner.method_tag), per-item details in `<run_dir>/eval/<S>/details/<set>@<method>.jsonl`, so a
  later `medpipe eval` of the same stage adds another method's result and replaces only the same
  set scored the same way.

Backends: `transformers` (default, batched, padding-aware: prompts sorted by length, left
padding, `batch_size` at a time) or `vllm` (GPU machines with vLLM installed; generation and
cue scoring): medpipe.stages.inference.backends.

Where the work is: sets (reading, planning) stages/evaluation/sets.py; prompts and language
prompts.py; option / letter scoring scoring.py; VoC voc.py; the drivers runner.py; harness
protocols protocols.py; metrics, judge, RAG, Text2DT their own modules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from medpipe.params import Checked, param
from medpipe.stages.evaluation.heldout import HeldoutParams
from medpipe.stagekind import StageKind
from medpipe.stages.evaluation.judge import JudgeParams
from medpipe.stages.evaluation.rag import RagParams

METHODS = ("ppl", "cue", "generate", "generate_then_cue")
from medpipe.stages.evaluation.protocols import PROTOCOLS  # noqa: E402 - the one list (a light module)
BACKENDS = ("transformers", "vllm")
LANGS = ("auto", "en", "zh")


@dataclass
class EvalParams(Checked):
    data: Any = param(None, "eval sets: path | conf/data name | source dict | list (one set per source)")
    protocol: str = param("native", "multiple choice as a harness does it: native (medpipe's prompts, `method`) | "
                                    "lm-eval | opencompass | medcare | cmexam", choices=PROTOCOLS)
    method: str = param("cue", "protocol native: ppl | cue | generate | generate_then_cue (MedCare: free answer, "
                               "then the cue and one letter)", choices=METHODS)
    shots: int = param(0, "k-shot examples from fewshot_data")
    task_models: bool = param(True, "C-Poly artifacts: a set named after a task uses that task's merged model")
    fewshot_data: Any = param(None, "dev split for k-shot prompting")
    lang: str = param("auto", "prompt language: auto (per item) | en | zh", choices=LANGS)
    chat: bool = param(False, "render mcq prompts through the chat template")
    reduction: str = param("mean", "ppl: mean | sum NLL of the option tokens", choices=("mean", "sum"))
    tokenize: str = param("char", "BLEU/ROUGE tokens: char | jieba", choices=("char", "jieba"))
    max_new_tokens: int = param(128, "generation sets")
    mcq_max_new_tokens: int = param(8, "method=generate (the other generating methods and protocols: max_new_tokens)")
    explain: bool = param(False, "mcq sets: also generate answer + explanation, BLEU/ROUGE vs the reference explanation")
    batch_size: int = param(16, "prompts per forward / generate call (sorted by length, padded); raise on a GPU")
    max_length: Optional[int] = param(None, "prompt tokens kept (from the left); null = all")
    limit: Optional[int] = param(None, "first N items of every set")
    data_dir: Optional[str] = param(None, "protocol lm-eval: where lm-eval task names (data=medqa_4options, "
                                          "multimedqa, ...) find their files; default $MEDPIPE_EVAL_DATA")
    backend: str = param("transformers", "transformers | vllm", choices=BACKENDS)
    on_error: Optional[str] = param(None, "fail | skip; default: the recipe's data.on_error",
                                    choices=(None, "fail", "skip"))
    rag: RagParams = param(help="retrieval-augmented prompts (rag.index = the corpus; null = off)", factory=RagParams)
    judge: JudgeParams = param(help="LLM judge for generation sets (judge.url; null = no judge)", factory=JudgeParams)
    needs_judge: bool = param(False, "the stage is a judge's (CCTE): without judge.url it is skipped with one line, "
                                     "the run goes on")
    pairwise: bool = param(False, "IIMedGPT Fig. 5: the input model against the model its adapter was trained on "
                                  "(after vs before DPO), judged pairwise (judge.template=iimedgpt) on the chat sets, "
                                  "win / tie / lose and each side's mean response length; needs judge.url (else "
                                  "skipped with one line)")
    groups: Any = param(None, "{group: [set names or patterns]}: each group's item-weighted accuracy over its mcq "
                              "sets as `<group>/acc` (a benchmark published as several files, e.g. "
                              "{cmmlu_med: ['cmmlu*']}; MedCare's cross-lingual set)")
    heldout: HeldoutParams = param(help="held-out perplexity / chat loss / preference accuracy (tiny profiles)",
                                   factory=HeldoutParams)

    def _rules(self):
        return [("protocol", not (self.protocol in ("lm-eval", "cmexam") and self.backend == "vllm"),
                 "native, opencompass or medcare with backend=vllm (lm-eval scores log-likelihoods, cmexam beam-searches)"),
                ("method", not (self.method == "ppl" and self.backend == "vllm"), "cue or generate with backend=vllm "
                 "(ppl needs backend=transformers)"),
                ("shots", self.shots >= 0, ">= 0"),
                ("fewshot_data", not self.shots or self.fewshot_data is not None,
                 f"set when shots={self.shots} (the dev split the examples come from)"),
                ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
                ("mcq_max_new_tokens", self.mcq_max_new_tokens >= 1, ">= 1"),
                ("batch_size", self.batch_size >= 1, ">= 1"),
                ("max_length", self.max_length is None or self.max_length >= 1, ">= 1 or null"),
                ("limit", self.limit is None or self.limit >= 1, ">= 1 or null"),
                ("groups", self.groups is None or (isinstance(self.groups, dict) and all(
                    isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v) for v in self.groups.values())),
                 "a mapping {group: [set name or pattern, ...]}"),
                ("judge.template", not self.pairwise or self.judge.template in ("iimedgpt", "medpipe"),
                 "iimedgpt or medpipe with pairwise: true (a pairwise prompt)")]


def add_groups(groups: dict, metrics: dict, results: dict, say=print) -> None:
    """`<group>/acc`: the item-weighted accuracy of the mcq sets whose names match the group's patterns."""
    from fnmatch import fnmatchcase

    for group, patterns in groups.items():
        members = [n for n, r in results.items() if r.get("kind") == "mcq"
                   and any(fnmatchcase(n, pat) for pat in patterns)]
        n = sum(results[m]["n"] for m in members)
        if not n:
            say(f"{group}: no mcq set matches {list(patterns)}")
            continue
        acc = sum(results[m]["metrics"]["acc"] * results[m]["n"] for m in members) / n
        results[group] = {"kind": "group", "n": n, "metrics": {"acc": acc}, "members": members}
        metrics[f"{group}/acc"] = acc
        say(f"{group}: acc={acc:.4g} ({n} items of {', '.join(members)})")


def evaluate_all(p: EvalParams, art: Any, out_dir: Any, data_opts: dict | None, say=print, model_opts: dict | None = None,
                 judge_key: str = "judge.url") -> tuple[dict, dict, str | None]:
    """Everything an eval does, for the stage and `medpipe eval` alike: the judge stages (skipped with
    one line when no judge is configured), pairwise before/after, or the sets, then `groups` and
    `heldout`. Returns (flat metrics, per-set results, the skip line or None)."""
    if (p.needs_judge or p.pairwise) and not p.judge.url:
        skipped = (f"skipped: no judge endpoint configured (set {judge_key}=http://HOST:PORT/v1 "
                   f"to score {'after vs before' if p.pairwise else 'with'} judge.template={p.judge.template})")
        say(skipped)
        return {}, {}, skipped
    if p.pairwise:
        from medpipe.stages.evaluation.pairwise import judge_before_after

        metrics, results = judge_before_after(p, art, data_opts, say)
        return metrics, results, None
    from medpipe.stages.evaluation.runner import evaluate

    say(f"evaluating {art.stage} ({art.model_path})")
    metrics, results = evaluate(p, art, out_dir, data_opts, say, model_opts)
    add_groups(p.groups or {}, metrics, results, say)
    if p.heldout.active():
        from medpipe.stages.evaluation.heldout import measure

        for set_name, res in measure(art.model_path, p.heldout, data_opts or {}, say).items():
            results[set_name] = res
            metrics.update({f"{set_name}/{k}": v for k, v in res["metrics"].items()})
    return metrics, results, None


class EvalStage(StageKind):
    """Evaluate the input model: exam accuracy (ppl | cue | generate), BLEU/ROUGE, PromptCBLUE, judge."""

    Params = EvalParams
    trains = False
    evaluates = True  # hook: results join the evaluated stage's row in reports; not a model to chat with

    def check(self, params: EvalParams, base: Any, data_opts: dict) -> list[str]:
        from medpipe.stages.evaluation.sets import check_pool, plan_sets, read_pool, sets_table

        sets = plan_sets(params, data_opts)
        if params.shots:
            check_pool(read_pool(params.fewshot_data, params.on_error or data_opts.get("on_error") or "fail"), params,
                       sets)
        return sets_table(sets)

    def run(self, ctx: Any):
        from medpipe.artifact import Artifact

        metrics, results, skipped = evaluate_all(ctx.params, ctx.input, ctx.output_dir, ctx.data, ctx.say, ctx.model,
                                                 judge_key=f"stages.{ctx.name}.judge.url")
        # the input model passes through, so a stage after an eval trains on the evaluated model
        return Artifact(stage=ctx.name, kind=ctx.kind, format=ctx.input.format, model_path=ctx.input.model_path,
                        tokenizer_path=ctx.input.tokenizer_path, base_model_path=ctx.input.base_model_path,
                        merged_path=ctx.input.merged_path, trust_remote_code=ctx.input.trust_remote_code,
                        metrics=metrics, evaluated_stage=ctx.input.stage, results=results,
                        handoff={"skipped": skipped} if skipped else {})
