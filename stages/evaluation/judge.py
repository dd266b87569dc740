"""LLM-as-judge through any OpenAI-compatible endpoint: MedCare's 1–5 scores per aspect
(fluency, relevance, completeness, proficiency) and IIMedGPT's pairwise Win / Tie / Lose, each
pair judged in both orders to cancel position bias (medpipe's choice: neither paper says it).
Malformed replies are counted, never guessed. Used by the eval stage (`judge.url`) and by
`medpipe compare` (`judge.template=iimedgpt` as an override).

Named templates (`judge.template`):
* `medpipe` (default): medpipe's own system + user prompts (JUDGE_*, PAIR_*);
* `medcare` (pointwise): MedCare's CCTE prompt, paper (arXiv:2406.17484) App. C.2 Figure 11
  "Prompt for GPT-4 Evaluation in CCTE", sent as one user message as the authors' code does
  (medcare/eval/gpt4_evaluations/cmb_eval.py); description = the dialogue before the question,
  question = the last user turn, solution = the reference answer;
* `iimedgpt` (pairwise): IIMedGPT's Appendix B "Evalution Prompt" (professionalism before
  fluency, no safety criterion), one user message; question = the dialogue.
The paper texts are the figure's / table's lines as printed (extraction paragraph breaks and
list markers removed; the spaces before punctuation are the papers').
"""
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
    template: str = param("medpipe", "judge prompt: medpipe | medcare (CCTE 1-5, pointwise) | iimedgpt (pairwise)")

    def _rules(self):
        return [("timeout", self.timeout > 0, "> 0"), ("max_tokens", self.max_tokens >= 1, ">= 1"),
                ("template", self.template in TEMPLATES, "one of " + ", ".join(TEMPLATES)),
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


MEDCARE_CCTE = """You are an AI evaluator specializing in assessing the quality of answers provided by other language models . Your primary goal is to rate the answers based on their fluency , relevance , completeness , proficiency in medicine . Use the following scales to evaluate each criterion :
Fluency :
1: Completely broken and unreadable sentence pieces
2: Mostly broken with few readable tokens
3: Moderately fluent but with limited vocabulary
4: Mostly coherent in expressing complex subjects
5: Human - level fluency
Relevance :
1: Completely unrelated to the question
2: Some relation to the question , but mostly off - topic
3: Relevant , but lacking focus or key details
4: Highly relevant , addressing the main aspects of the question
5: Directly relevant and precisely targeted to the question
Completeness :
1: Extremely incomplete
2: Almost incomplete with limited information
3: Moderate completeness with some information
4: Mostly complete with most of the information displayed
5: Fully complete with all information presented
Proficiency in medicine :
1: Using plain languages with no medical terminology .
2: Equipped with some medical knowledge but lacking in - depth details
3: Conveying moderately complex medical information with clarity
4: Showing solid grasp of medical terminology but having some minor mistakes in detail
5: Fully correct in all presented medical knowledge
You will be provided with the following information :
- a description
- a question based on the description and conversation
- the solution to the question
- a model' s answer to the question
[description]
{description}
[end of description]
[question]
{question}
[end of question]
[solution]
{solution}
[end of solution]
[answer]
{answer}
[end of answer]
Make sure to provide your evaluation results in JSON format and ONLY the JSON , with separate ratings for each of the mentioned criteria as in the following example :
{{ "fluency": 3, "relevance": 3, "completeness": 3, "proficiency": 3 }}"""  # noqa: E501 - the figure's lines

IIMEDGPT_PAIR = """If you are a professional physician, you need to analyze based on two answers to the question, as follows:
Question:{question} Answer1:{answer1} Answer2:{answer2} Evaluation Criteria: 1. Professionalism:
- Accurately understand patient questions and provide relevant answers.
- Clearly and concisely explain complex medical knowledge.
- Proactively inquire about the patient's condition when necessary.
2. Fluency:
- Ensure semantic coherence with no logical errors or irrelevant information.
- Maintain consistency in style and content.
- Maintain a friendly, enthusiastic answering attitude.
Note:Evaluate based on the importance of Professionalism > fluency. If there's a conflict, prioritize the former.
Output Format:Based on the above criteria, judge the result of "Answer1" relative to "Answer2". Output as: Win, Lose, Tie."""  # noqa: E501

TEMPLATES = ("medpipe", "medcare", "iimedgpt")


def pointwise_messages(conv: list[dict], answer: str, reference: str, template: str = "medpipe") -> list[dict]:
    """The messages asking the judge for 1–5 scores of `answer` (the reply to conv's last turn)."""
    if template == "medcare":
        before = conv[:-1]
        return [{"role": "user", "content": MEDCARE_CCTE.format(
            description=_dialogue(before) if before else "", question=conv[-1]["content"], solution=reference,
            answer=answer)}]
    if template != "medpipe":
        raise ValueError(f"judge.template {template!r} has no pointwise prompt (medpipe, medcare)")
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_USER.format(dialogue=_dialogue(conv), reference=reference, answer=answer)}]


def pair_messages(conv: list[dict], a: str, b: str, template: str = "medpipe") -> list[dict]:
    """The messages asking whether answer `a` beats answer `b` (Win / Lose / Tie, seen from a)."""
    if template == "iimedgpt":
        question = conv[-1]["content"] if len(conv) == 1 else _dialogue(conv)
        return [{"role": "user", "content": IIMEDGPT_PAIR.format(question=question, answer1=a, answer2=b)}]
    if template != "medpipe":
        raise ValueError(f"judge.template {template!r} has no pairwise prompt (medpipe, iimedgpt)")
    return [{"role": "system", "content": PAIR_SYSTEM},
            {"role": "user", "content": PAIR_USER.format(dialogue=_dialogue(conv), a=a, b=b)}]


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
                    max_tokens: int = 256, template: str = "medpipe") -> dict:
    """MedCare-style 1–5 scores per aspect; malformed replies are counted and left out of the means."""
    from medpipe.stages.evaluation.metrics import JUDGE_ASPECTS, parse_judge_scores

    items = []
    for conv, ans, ref in zip(convs, answers, refs):
        msgs = pointwise_messages(conv, ans, ref, template)
        reply = client.chat(msgs, max_tokens=max_tokens)
        scores = parse_judge_scores(reply)
        items.append({"scores": scores, "reply": reply if scores is None else None})
    ok = [it["scores"] for it in items if it["scores"]]
    means = {a: sum(s[a] for s in ok) / len(ok) for a in JUDGE_ASPECTS} if ok else {}
    return {"items": items, "summary": {"n": len(items), "scored": len(ok), "malformed": len(items) - len(ok),
                                        "means": means}}


_FLIP = {"win": "lose", "lose": "win", "tie": "tie"}


def judge_pair(client: Any, conv: list[dict], a: str, b: str, max_tokens: int = 16, template: str = "medpipe") -> dict:
    """Judge (a, b) in both orders. The verdict is for a: when the two orders agree, theirs; when
    they disagree, 'tie' and counted inconsistent; a malformed reply leaves the pair unjudged."""
    from medpipe.stages.evaluation.metrics import parse_pairwise

    def ask(x: str, y: str) -> tuple[str | None, str]:
        msgs = pair_messages(conv, x, y, template)
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
            max_new_tokens: int = 128, batch_size: int = 8, say=print, template: str = "medpipe") -> dict:
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
        j = judge_pair(client, conv, a, b, template=template)
        items.append({"_loc": r.get("_loc"), "turns": len(conv), "question": conv[-1]["content"], "a": a, "b": b, **j})
    summary = pairwise_summary(items)
    return {"a": name_a, "b": name_b, "summary": summary, "line": pairwise_line(name_a, name_b, summary), "items": items}
