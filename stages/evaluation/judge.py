"""LLM-as-judge through any OpenAI-compatible endpoint: MedCare's 1–5 scores per aspect
(fluency, relevance, completeness, proficiency) and IIMedGPT's pairwise Win / Tie / Lose, each
pair judged in both orders to cancel position bias. Malformed replies are counted, never guessed.
Used by the eval stage (`judge.url`) and by `medpipe compare`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from medpipe.params import Checked, param


@dataclass
class JudgeParams(Checked):
    """LLM-as-judge through an OpenAI-compatible endpoint (null url = no judge)."""

    _where: ClassVar[str] = "judge."
    url: Optional[str] = param(None, "endpoint, e.g. http://127.0.0.1:8000/v1; null = no judge")
    model: Optional[str] = param(None, "model name to ask for (default: the endpoint's first model)")
    api_key_env: Optional[str] = param(None, "name of the env var holding the API key")
    timeout: float = param(120.0, "seconds per request")
    max_tokens: int = param(256, "judge reply tokens")
    limit: Optional[int] = param(None, "items judged per set (null = all)")

    def _rules(self):
        return [("timeout", self.timeout > 0, "> 0"), ("max_tokens", self.max_tokens >= 1, ">= 1"),
                ("limit", self.limit is None or self.limit >= 1, ">= 1 or null")]


JUDGE_SYSTEM = ("You are a senior physician grading an AI assistant's answer to a medical question. "
                "Rate it from 1 (very poor) to 5 (excellent) on four aspects: fluency (clear, natural language), "
                "relevance (answers what was asked), completeness (covers what a doctor would cover), and "
                "proficiency (medically correct and professional).")
JUDGE_USER = ("Dialogue so far:\n{dialogue}\n\nReference answer (may be incomplete):\n{reference}\n\n"
              "Assistant's answer:\n{answer}\n\nReply with only a JSON object: "
              '{{"fluency": n, "relevance": n, "completeness": n, "proficiency": n}} with integers 1-5.')
PAIR_SYSTEM = ("You are a senior physician comparing two AI assistants' answers to the same medical question. "
               "Judge professionalism (medical correctness, safety) first, then fluency.")
PAIR_USER = ("Dialogue so far:\n{dialogue}\n\nAnswer 1:\n{a}\n\nAnswer 2:\n{b}\n\n"
             "Is answer 1 better than answer 2? Reply with exactly one word: Win (answer 1 is better), "
             "Lose (answer 2 is better) or Tie.")


def _dialogue(conv: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in conv)


def judge_client(j: JudgeParams):
    from medpipe.stages.inference.runtime import OpenAIClient, api_key_from_env

    from medpipe.stages.inference.runtime import EndpointError

    client = OpenAIClient(j.url, model=j.model, api_key=api_key_from_env(j.api_key_env), timeout=j.timeout)
    try:
        client.check()
    except EndpointError as e:
        raise EndpointError(f"judge: {e}. Nothing was evaluated and finished stages are kept: start the judge "
                            f"endpoint or fix judge.url, then rerun (done stages are reused)") from None
    return client


def judge_pointwise(client: Any, convs: list[list[dict]], answers: list[str], refs: list[str],
                    max_tokens: int = 256) -> dict:
    """MedCare-style 1–5 scores per aspect; malformed replies are counted and left out of the means."""
    from medpipe.stages.evaluation.metrics import JUDGE_ASPECTS, parse_judge_scores

    items = []
    for conv, ans, ref in zip(convs, answers, refs):
        msgs = [{"role": "system", "content": JUDGE_SYSTEM},
                {"role": "user", "content": JUDGE_USER.format(dialogue=_dialogue(conv), reference=ref, answer=ans)}]
        reply = client.chat(msgs, max_tokens=max_tokens)
        scores = parse_judge_scores(reply)
        items.append({"scores": scores, "reply": reply if scores is None else None})
    ok = [it["scores"] for it in items if it["scores"]]
    means = {a: sum(s[a] for s in ok) / len(ok) for a in JUDGE_ASPECTS} if ok else {}
    return {"items": items, "summary": {"n": len(items), "scored": len(ok), "malformed": len(items) - len(ok),
                                        "means": means}}


_FLIP = {"win": "lose", "lose": "win", "tie": "tie"}


def judge_pair(client: Any, conv: list[dict], a: str, b: str, max_tokens: int = 16) -> dict:
    """Judge (a, b) in both orders. The verdict is for a: when the two orders agree, theirs; when
    they disagree, 'tie' and counted inconsistent; a malformed reply leaves the pair unjudged."""
    from medpipe.stages.evaluation.metrics import parse_pairwise

    def ask(x: str, y: str) -> tuple[str | None, str]:
        msgs = [{"role": "system", "content": PAIR_SYSTEM},
                {"role": "user", "content": PAIR_USER.format(dialogue=_dialogue(conv), a=x, b=y)}]
        reply = client.chat(msgs, max_tokens=max_tokens)
        return parse_pairwise(reply), reply

    v1, r1 = ask(a, b)
    v2, r2 = ask(b, a)
    out = {"first": v1, "second": v2}
    if v1 is None or v2 is None:
        out.update(verdict=None, malformed=True, replies=[r1, r2])
        return out
    second = _FLIP[v2]  # the swapped order's verdict, seen from a
    out.update(verdict=v1 if v1 == second else "tie", inconsistent=v1 != second, malformed=False)
    return out


def pairwise_summary(results: list[dict]) -> dict:
    judged = [r for r in results if not r.get("malformed")]
    n = len(judged)
    count = {v: sum(r["verdict"] == v for r in judged) for v in ("win", "tie", "lose")}
    return {"n": len(results), "judged": n, "malformed": len(results) - n,
            "inconsistent": sum(bool(r.get("inconsistent")) for r in judged),
            **{v: (count[v] / n if n else 0.0) for v in count}, "counts": count}


def pairwise_line(a: str, b: str, s: dict) -> str:
    return (f"{a} vs {b}: {s['win'] * 100:.0f} % win, {s['tie'] * 100:.0f} % tie, {s['lose'] * 100:.0f} % lose "
            f"({s['judged']} judged in both orders, {s['inconsistent']} inconsistent → tie, {s['malformed']} malformed)")


def compare(model_a: Any, model_b: Any, name_a: str, name_b: str, records: list[dict], client: Any,
            max_new_tokens: int = 128, batch_size: int = 8, say=print) -> dict:
    """IIMedGPT-style pairwise comparison: both models answer the last user turn of every
    conversation (single- or multi-turn, earlier turns as given), the judge compares the answers
    in both orders. Returns {"a", "b", "summary", "items"}."""
    convs = []
    for r in records:
        msgs = [{"role": m["role"], "content": m["content"]} for m in r["messages"]]
        last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
        convs.append(msgs[: last_user + 1])
    say(f"{name_a} and {name_b} answer {len(convs)} questions")
    ans_a = [c.text for c in model_a.generate([model_a.render(c) for c in convs], max_new_tokens=max_new_tokens,
                                              batch_size=batch_size)]
    ans_b = [c.text for c in model_b.generate([model_b.render(c) for c in convs], max_new_tokens=max_new_tokens,
                                              batch_size=batch_size)]
    items = []
    for r, conv, a, b in zip(records, convs, ans_a, ans_b):
        j = judge_pair(client, conv, a, b)
        items.append({"_loc": r.get("_loc"), "turns": len(conv), "question": conv[-1]["content"], "a": a, "b": b, **j})
    summary = pairwise_summary(items)
    return {"a": name_a, "b": name_b, "summary": summary, "line": pairwise_line(name_a, name_b, summary), "items": items}
