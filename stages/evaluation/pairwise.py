"""IIMedGPT's DPO ablation (paper 004 §6, Fig. 5) as an eval stage (`pairwise: true`): the input
model (after DPO) and the model its adapter was trained on (before DPO: the adapter's
`base_model_path`, the SFT model) answer the same chat sets; the judge compares the two answers
in both orders (stages/evaluation/judge.py `compare`, `judge.template=iimedgpt`: professionalism,
then fluency, one verdict) and each side's mean response length is recorded, as Fig. 5 reports.
Metrics per set: `win`, `tie`, `lose` (after against before), `malformed`, `len_after`, `len_before`
(characters)."""
from __future__ import annotations

from typing import Any


def judge_before_after(p: Any, art: Any, data_opts: dict | None, say=print) -> tuple[dict, dict]:
    from medpipe.errors import ConfigError
    from medpipe.stages.inference.runtime import LocalModel

    from .judge import compare, judge_client
    from .sets import plan_sets

    if not art.base_model_path:
        raise ConfigError(f"pairwise: the input stage '{art.stage}' is not an adapter stage, so there is no "
                          f"before-model to compare with (put the pairwise stage after a LoRA stage, e.g. dpo)")
    sets = [s for s in plan_sets(p, data_opts) if s.kind == "generation"]
    if not sets:
        raise ConfigError("pairwise: needs chat sets (alpaca, sharegpt, huatuo, ... data) to answer")
    client = judge_client(p.judge)
    say(f"judge: {client.model} at {client.base}; {art.stage} (after) against {art.base_model_path} (before)")
    after = LocalModel.from_artifact(art, name=f"{art.stage}")
    before = LocalModel(art.base_model_path, art.base_model_path, trust_remote_code=art.trust_remote_code,
                        name="before")
    metrics: dict = {}
    results: dict = {}
    for s in sets:
        records = s.records[: p.judge.limit] if p.judge.limit else s.records
        out = compare(after, before, art.stage, "before", records, client, max_new_tokens=p.max_new_tokens,
                      batch_size=p.batch_size, say=say, template=p.judge.template)
        summ = out["summary"]
        lens = {side: sum(len(i[key]) for i in out["items"]) / max(1, len(out["items"]))
                for side, key in (("len_after", "a"), ("len_before", "b"))}
        m = {"win": summ["win"], "tie": summ["tie"], "lose": summ["lose"], "malformed": summ["malformed"], **lens}
        name = f"{s.name}_pairwise"
        results[name] = {"kind": "pairwise", "n": summ["n"], "metrics": m, "line": out["line"]}
        metrics.update({f"{name}/{k}": v for k, v in m.items()})
        say(f"{s.name}: {out['line']}; mean length {lens['len_after']:.0f} vs {lens['len_before']:.0f} characters")
    return metrics, results
