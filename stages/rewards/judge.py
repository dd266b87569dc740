"""`judge`: a rubric score in [0, 1] from any OpenAI-compatible endpoint (`medpipe serve` of
another stage, vLLM, a hosted model).

The judge sees the rubric (system), the question (the prompt's last user turn), the gold answer
when the item has one, and the completion; it replies with one number between 0 and 1. A reply
without exactly one such number is malformed: not scored (None, left out of the group's mean by
TRL) and counted (`judge/malformed` in the logs). Failure mode: the endpoint is reached once
before training (`start`; unreachable = the stage fails before its first step, one line); a
request that fails later (timeout, HTTP error) fails the stage (`on_failure: fail`, default — it
resumes from its last checkpoint once the endpoint is back) or leaves that batch unscored
(`on_failure: skip`, counted as `judge/failed`).
"""
from __future__ import annotations

import re
from typing import Any, Sequence

from .answers import completion_text

RUBRIC = ("You grade a medical assistant's answer. Score 1 for an answer that is medically correct, safe and "
          "answers the question; 0 for one that is wrong, unsafe or off-topic; in between for partly right "
          "answers. Reply with only the score, a number between 0 and 1.")
USER = "Question:\n{question}\n\n{reference}Answer to grade:\n{answer}\n\nScore (0 to 1):"
_NUM_RE = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)(?![\d.])")


def parse_score(reply: str | None) -> float | None:
    """The one number in [0, 1] a judge replied, or None (none, several different, out of range)."""
    found = {float(x) for x in _NUM_RE.findall(reply or "")}
    if len(found) != 1:
        return None
    score = found.pop()
    return score if 0.0 <= score <= 1.0 else None


def _question(prompt: Any) -> str:
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[-1]) if users else ""
    return str(prompt)


class Judge:
    def __init__(self, url: str | None = None, model: str | None = None, api_key_env: str | None = None,
                 timeout: float = 30.0, max_tokens: int = 8, rubric: str = RUBRIC, on_failure: str = "fail"):
        if not url:
            raise ValueError("url: the judge endpoint, e.g. http://127.0.0.1:8000/v1")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        if on_failure not in ("fail", "skip"):
            raise ValueError(f"on_failure must be fail or skip, got {on_failure!r}")
        self.url, self.model, self.api_key_env = url, model, api_key_env
        self.timeout, self.max_tokens, self.rubric, self.on_failure = float(timeout), int(max_tokens), rubric, on_failure
        self.client = None
        self.malformed = self.failed = 0

    def start(self) -> None:
        """Reach the endpoint before training (EndpointError, one line, when it does not answer)."""
        from medpipe.stages.inference.runtime import EndpointError, OpenAIClient, api_key_from_env

        self.client = OpenAIClient(self.url, model=self.model, api_key=api_key_from_env(self.api_key_env),
                                   timeout=self.timeout)
        try:
            self.client.check()
        except EndpointError as e:
            raise EndpointError(f"judge reward: {e}; nothing was trained: start the endpoint or fix the reward's url")
        return None

    def __call__(self, prompts: Sequence, completions: Sequence, answer: Sequence = (), log_metric: Any = None,
                 **_: Any) -> list[float | None]:
        from medpipe.errors import MedpipeError
        from medpipe.stages.inference.runtime import EndpointError

        if self.client is None:
            self.start()
        out: list[float | None] = []
        for i, (p, c) in enumerate(zip(prompts, completions)):
            # the question lists the options: the gold letters are the reference
            ref = f"Reference answer: {''.join(answer[i])}\n\n" if answer and answer[i] else ""
            msgs = [{"role": "system", "content": self.rubric},
                    {"role": "user", "content": USER.format(question=_question(p), reference=ref,
                                                            answer=completion_text(c))}]
            try:
                reply = self.client.chat(msgs, max_tokens=self.max_tokens)
            except EndpointError as e:
                if self.on_failure == "fail":
                    raise MedpipeError(f"judge reward: {e}; the stage stopped (it resumes from its last checkpoint "
                                       f"when rerun), or set on_failure: skip") from None
                self.failed += 1
                out.append(None)
                continue
            score = parse_score(reply)
            if score is None:
                self.malformed += 1
            out.append(score)
        if log_metric is not None:
            log_metric("judge/malformed", float(self.malformed))
            log_metric("judge/failed", float(self.failed))
        return out
