"""Rewards on exact strings: the answer parse shared with the eval stage, multi-answer sets,
Chinese and English shapes, malformed tags; the plugin registry, weights and the python reward;
the judge's score parse and failure modes."""
from __future__ import annotations

import pytest

from medpipe.stages import rewards
from medpipe.stages.rewards.answers import format_problem, parse_answer, prompt_messages
from medpipe.stages.rewards.builtin import Format, Length, McqExact
from medpipe.stages.rewards.judge import Judge, parse_score

ITEM = {"id": "q1", "question": "Which drug is first-line for type 2 diabetes?", "context": None,
        "options": {"A": "Metformin", "B": "Insulin", "C": "Aspirin", "D": "Warfarin"}, "answer": ["A"]}
ZH_ITEM = {"id": "z1", "question": "二型糖尿病的一线用药是", "context": None,
           "options": {"A": "二甲双胍", "B": "胰岛素", "C": "阿司匹林", "D": "华法林", "E": "肝素"}, "answer": ["A", "C"]}


def mcq(completions, gold, letters="ABCD", **opts):
    return McqExact(**opts)(prompts=[""] * len(completions), completions=completions,
                            answer=[gold] * len(completions), letters=[letters] * len(completions))


@pytest.mark.parametrize("text, reward", [
    ("<answer>A</answer>", 1.0),
    ("Metformin lowers glucose. <answer>A</answer>", 1.0),
    ("<answer>B</answer>", 0.0),
    ("The answer is A", 1.0),                     # the eval parser's cue, no tag
    ("The answer is B.", 0.0),
    ("A. Metformin", 1.0),                        # a leading letter, as eval reads it
    ("<answer>E</answer>", 0.0),                  # not an option: invalid, never a guess
    ("I am not sure.", 0.0),
    ("<answer>B</answer> ... <answer>A</answer>", 1.0),   # the last tag counts
])
def test_mcq_exact_english(text, reward):
    assert mcq([text], ["A"]) == [reward]


@pytest.mark.parametrize("text, reward", [
    ("答案为AC", 1.0), ("答案为A、C", 1.0), ("<answer>AC</answer>", 1.0), ("<answer>C, A</answer>", 1.0),
    ("答案为A", 0.0),            # a subset of a multi-answer set is wrong
    ("答案为ACD", 0.0),          # a superset too
    ("<answer>A</answer>答案为AC", 0.0),   # the tag wins over the text around it
])
def test_mcq_exact_chinese_multi_answer(text, reward):
    assert mcq([text], ["A", "C"], letters="ABCDE") == [reward]


def test_mcq_exact_require_tag_and_unlabeled():
    assert mcq(["The answer is A", "<answer>A</answer>"], ["A"], require_tag=True) == [0.0, 1.0]
    assert McqExact()(prompts=["", ""], completions=["A", "A"], answer=[[], ["A"]], letters=["AB", "AB"]) == [None, 1.0]
    assert mcq(["<answer>A</answer>", "<answer>B</answer>"], ["A"], correct=2, wrong=-0.5) == [2.0, -0.5]


def test_mcq_exact_reads_letters_as_the_eval_stage_does():
    from medpipe.stages.evaluation.metrics import extract_letters

    for text in ("The correct answer is (C)", "Answer: D", "答案：B", "the answer is Absolutely"):
        eval_letters, _ = extract_letters(text, "ABCD")
        assert parse_answer(text, "ABCD")[0] == eval_letters


@pytest.mark.parametrize("text, problem", [
    ("<answer>A</answer>", None),
    ("Because metformin... <answer>A</answer>\n", None),
    ("A", "answer tags: want exactly one <answer>…</answer>"),
    ("<answer>A", "answer tags: want exactly one <answer>…</answer>"),
    ("<answer>A</answer><answer>B</answer>", "answer tags: want exactly one <answer>…</answer>"),
    ("</answer>A<answer>", "answer tags: </answer> before <answer>"),
    ("<answer>A</answer> and more", "text after </answer>"),
    ("<answer>maybe</answer>", "answer: no_answer"),
    ("<answer>F</answer>", "answer: unknown_letter"),
])
def test_format_problems(text, problem):
    assert format_problem(text, "ABCD") == problem


def test_format_reward_values_and_think():
    f = Format(valid=0.0, malformed=-1.0)   # Med-RLVR: −1 for a malformed answer
    assert f(prompts=["", ""], completions=["<answer>A</answer>", "A"], letters=["ABCD"] * 2) == [0.0, -1.0]
    t = Format(think=True)
    assert t(prompts=[""] * 2, completions=["<think>metformin first</think>\n<answer>A</answer>", "<answer>A</answer>"],
             letters=["ABCD"] * 2) == [1.0, 0.0]
    # conversational completions as TRL hands them
    assert Format()(prompts=[[]], completions=[[{"role": "assistant", "content": "<answer>B</answer>"}]],
                    letters=["ABCD"]) == [1.0]


def test_length_reward():
    assert Length(scale=-0.5, target=2)(prompts=[""] * 3, completions=["", "", ""],
                                        completion_ids=[[1], [1, 2, 3], [1, 2, 3, 4, 5]]) == [0.0, -0.5, -1.5]
    with pytest.raises(ValueError, match="target must be >= 0"):
        Length(target=-1)


def test_prompt_messages_exact_text_and_shots():
    shot = {**ITEM, "id": "s", "question": "Which drug thins the blood?", "answer": ["D"]}
    msgs = prompt_messages(ITEM, shots=[shot])
    assert msgs[1] == {"role": "assistant", "content": "<answer>D</answer>"}
    assert msgs[2] == {"role": "user", "content":
                       "Question: Which drug is first-line for type 2 diabetes?\nOptions:\nA. Metformin\nB. Insulin\n"
                       "C. Aspirin\nD. Warfarin\nGive the final answer as <answer>X</answer>, where X is the letter "
                       "of the correct option (all correct letters if several are correct)."}
    zh = prompt_messages(ZH_ITEM)[0]["content"]
    assert zh.startswith("问题：二型糖尿病的一线用药是\n选项：\nA. 二甲双胍") and zh.endswith("写出全部字母）。")


def test_registry_problems_and_weights(tmp_path, monkeypatch):
    assert {"mcq_exact", "format", "length", "judge"} <= set(rewards.registered())
    assert rewards.problems([{"name": "nope"}]) == [
        "rewards[0].name: unknown reward 'nope' (available: " + ", ".join(sorted(rewards.registered())) + ")"]
    assert rewards.problems([{"name": "format", "python": "a:b"}])[0].startswith("rewards[0]: exactly one of name")
    assert rewards.problems([{"python": "no_colon"}]) == ["rewards[0].python: 'pkg.module:function', got 'no_colon'"]
    assert rewards.problems([{"name": "format", "weight": "high"}]) == ["rewards[0].weight: a number, got 'high'"]
    assert rewards.problems([]) and rewards.problems("mcq_exact")

    (tmp_path / "my_rewards.py").write_text(
        "def brevity(prompts, completions, **kw):\n    return [1.0 / (1 + len(c)) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    funcs, weights = rewards.build([{"name": "format", "weight": 0.5}, {"python": "my_rewards:brevity", "weight": 2},
                                    {"name": "format", "malformed": -1}])
    assert [f.__name__ for f in funcs] == ["format", "brevity", "format_2"] and weights == [0.5, 2.0, 1.0]
    assert funcs[1](prompts=[""], completions=["abc"]) == [0.25]

    from medpipe.errors import ConfigError

    with pytest.raises(ConfigError, match=r"rewards\[0\] \(format\): .*unexpected keyword argument 'valdi'"):
        rewards.build([{"name": "format", "valdi": 1}])
    with pytest.raises(ConfigError, match="python reward 'my_rewards:nothing' cannot be loaded: AttributeError"):
        rewards.build([{"python": "my_rewards:nothing"}])


@pytest.mark.parametrize("reply, score", [("0.8", 0.8), ("Score: 1", 1.0), ("0", 0.0), ("1.5", None),
                                          ("0.2 or 0.4", None), ("great answer", None), ("0.5 (0.5)", 0.5)])
def test_judge_score_parse(reply, score):
    assert parse_score(reply) == score


def test_judge_failure_modes(monkeypatch):
    from medpipe.errors import MedpipeError
    from medpipe.stages.inference.runtime import EndpointError, OpenAIClient

    with pytest.raises(ValueError, match="url: the judge endpoint"):
        Judge()
    j = Judge(url="http://127.0.0.1:9/v1", timeout=0.5)
    with pytest.raises(EndpointError, match=r"judge reward: endpoint http://127.0.0.1:9/v1/models is unreachable .*"
                                            r"nothing was trained"):
        j.start()

    replies = iter(["0.9", "no idea", EndpointError("endpoint x answered HTTP 500: boom")])

    def chat(self, messages, max_tokens=256, temperature=0.0):
        r = next(replies)
        if isinstance(r, Exception):
            raise r
        assert "Reference answer: A" in messages[1]["content"]
        return r

    monkeypatch.setattr(OpenAIClient, "chat", chat)
    logged = {}
    skip = Judge(url="http://x/v1", on_failure="skip")
    skip.client = OpenAIClient("http://x/v1", model="m")
    assert skip(prompts=["q"] * 3, completions=["a"] * 3, answer=[["A"]] * 3,
                log_metric=lambda k, v: logged.__setitem__(k, v)) == [0.9, None, None]
    assert logged == {"judge/malformed": 1.0, "judge/failed": 1.0}
    replies = iter([EndpointError("endpoint x timed out")])
    fail = Judge(url="http://x/v1")
    fail.client = OpenAIClient("http://x/v1", model="m")
    with pytest.raises(MedpipeError, match="judge reward: endpoint x timed out; the stage stopped"):
        fail(prompts=["q"], completions=["a"], answer=[["A"]])


def test_heldout_score_exact_figures():
    from medpipe.stages.rewards.heldout import score

    funcs, weights = rewards.build([{"name": "mcq_exact", "require_tag": True},
                                    {"name": "format", "valid": 0.0, "malformed": -1.0}])
    rows = [{"prompt": [{"role": "user", "content": "q"}], "answer": ["A"], "letters": "ABCD", "id": str(i)}
            for i in range(4)]
    samples = [("<answer>A</answer>", 5), ("<answer>B</answer>", 5), ("The answer is A", 4), ("", 1)]
    m = score(rows, samples, funcs, weights)
    assert m == {"n": 4, "reward_mcq_exact": 0.25, "reward_format": -0.5, "reward": (1 + 0 - 1 - 1) / 4,
                 "format_valid": 0.5, "accuracy": 0.5, "completion_tokens": 3.75}
