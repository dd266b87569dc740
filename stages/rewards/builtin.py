"""The built-in rewards (entry points in pyproject.toml, group `medpipe.rewards`).

Each class is built with its options from the recipe and called by TRL once per batch with the
prompts, the completions and the dataset's columns (`answer`: gold letters, `letters`: the
item's option letters — the grpo stage's dataset carries both). See `medpipe.stages.rewards`.
"""
from __future__ import annotations

from typing import Any, Sequence

from .answers import completion_text, format_problem, parse_answer


def _valid(letters: Any) -> list[str]:
    return list(letters) if letters else list("ABCDEFGHIJ")


class McqExact:
    """`correct` when the letters read from the completion equal the gold set exactly (single
    answer: the letter; CMB/CMExam multi-answer: every gold letter and no other), else `wrong`.
    `require_tag`: only an answer inside `<answer>…</answer>` counts (Med-R1, Med-RLVR).
    Items without a gold answer are not scored (None)."""

    def __init__(self, correct: float = 1.0, wrong: float = 0.0, require_tag: bool = False):
        self.correct, self.wrong, self.require_tag = float(correct), float(wrong), bool(require_tag)

    def __call__(self, prompts: Sequence, completions: Sequence, answer: Sequence = (), letters: Sequence = (),
                 **_: Any) -> list[float | None]:
        if len(answer) != len(completions):
            raise ValueError("mcq_exact needs the gold letters in an `answer` column (mcq data)")
        out: list[float | None] = []
        for c, gold, valid in zip(completions, answer, letters or [None] * len(completions)):
            if not gold:
                out.append(None)
                continue
            got, _ = parse_answer(completion_text(c), _valid(valid), self.require_tag)
            out.append(self.correct if got is not None and sorted(got) == sorted(gold) else self.wrong)
        return out


class Format:
    """`valid` for a completion in the asked format (answers.format_problem: one `<answer>` tag
    with option letters, nothing after it, `<think>` first when `think`), else `malformed`
    (Med-RLVR's −1: `malformed: -1.0, valid: 0.0`)."""

    def __init__(self, valid: float = 1.0, malformed: float = 0.0, think: bool = False):
        self.valid, self.malformed, self.think = float(valid), float(malformed), bool(think)

    def __call__(self, prompts: Sequence, completions: Sequence, letters: Sequence = (), **_: Any) -> list[float]:
        letters = letters or [None] * len(completions)
        return [self.valid if format_problem(completion_text(c), _valid(v), self.think) is None else self.malformed
                for c, v in zip(completions, letters)]


class Length:
    """`scale` × the completion's length beyond `target` (scale < 0: a penalty on long answers),
    counted in `unit`: tokens (TRL's completion ids) or chars (of the decoded text)."""

    def __init__(self, scale: float = -0.001, target: int = 0, unit: str = "tokens"):
        if target < 0:
            raise ValueError(f"target must be >= 0, got {target}")
        if unit not in ("tokens", "chars"):
            raise ValueError(f"unit must be tokens or chars, got {unit!r}")
        self.scale, self.target, self.unit = float(scale), int(target), unit

    def __call__(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None,
                 **_: Any) -> list[float]:
        if self.unit == "tokens" and completion_ids is None:
            raise ValueError("length (unit tokens) needs TRL's completion_ids")
        sizes = ([len(ids) for ids in completion_ids] if self.unit == "tokens"
                 else [len(completion_text(c)) for c in completions])
        return [self.scale * max(0, n - self.target) for n in sizes]
