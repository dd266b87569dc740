"""`eval` — evaluate the input model (the previous stage's output, or `from: <stage>`) on exam,
generation and PromptCBLUE sets; results land in the evaluated stage's row of the report.

The parameters and the stage kind. What each set kind, method and protocol does, the records it
writes and where the code is: docs/EVAL.md.
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
