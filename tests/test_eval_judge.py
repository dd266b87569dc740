"""Named judge templates (stages/evaluation/judge.py): the exact messages sent for MedCare's CCTE
prompt and IIMedGPT's pairwise prompt, and that `judge.template` reaches the judge."""
from __future__ import annotations

import pytest

from medpipe.stages.evaluation.judge import JudgeParams, judge_pair, judge_pointwise, pair_messages, pointwise_messages

CONV = [{"role": "user", "content": "I have had a headache for two days."},
        {"role": "assistant", "content": "Any fever?"}, {"role": "user", "content": "No. What should I take?"}]


class Recorder:
    """A judge client that records the messages and replies from a script."""

    def __init__(self, replies):
        self.replies, self.sent = list(replies), []

    def chat(self, messages, max_tokens=16, temperature=0.0):
        self.sent.append(messages)
        return self.replies.pop(0)


def test_medcare_ccte_prompt_is_figure_11():
    """MedCare (arXiv:2406.17484) App. C.2, Figure 11 "Prompt for GPT-4 Evaluation in CCTE": one user
    message (as medcare/eval/gpt4_evaluations/cmb_eval.py sends it); the figure's lines as printed,
    paragraph breaks of the text extraction removed."""
    msgs = pointwise_messages(CONV, "Paracetamol.", "Rest; paracetamol if needed.", "medcare")
    assert [m["role"] for m in msgs] == ["user"]
    text = msgs[0]["content"]
    assert text.startswith("You are an AI evaluator specializing in assessing the quality of answers provided by other "
                           "language models . Your primary goal is to rate the answers based on their fluency , "
                           "relevance , completeness , proficiency in medicine . Use the following scales to evaluate "
                           "each criterion :\nFluency :\n1: Completely broken and unreadable sentence pieces\n")
    assert "\n5: Human - level fluency\nRelevance :\n" in text
    assert "\n4: Showing solid grasp of medical terminology but having some minor mistakes in detail\n" in text
    assert ("- a model' s answer to the question\n[description]\nuser: I have had a headache for two days.\n"
            "assistant: Any fever?\n[end of description]\n[question]\nNo. What should I take?\n[end of question]\n"
            "[solution]\nRest; paracetamol if needed.\n[end of solution]\n[answer]\nParacetamol.\n[end of answer]\n") in text
    assert text.endswith('as in the following example :\n{ "fluency": 3, "relevance": 3, "completeness": 3, '
                         '"proficiency": 3 }')
    assert len(text.splitlines()) == 44 + 1  # the figure has 44 lines; this two-line description adds one


def test_iimedgpt_pairwise_prompt_is_appendix_b():
    """IIMedGPT (Procedia CS) Appendix B "Evalution Prompt": professionalism before fluency, no safety
    criterion; the table's lines as printed (paragraph breaks removed)."""
    msgs = pair_messages(CONV[:1], "Rest.", "Take aspirin.", "iimedgpt")
    assert msgs == [{"role": "user", "content": (
        "If you are a professional physician, you need to analyze based on two answers to the question, as follows:\n"
        "Question:I have had a headache for two days. Answer1:Rest. Answer2:Take aspirin. Evaluation Criteria: "
        "1. Professionalism:\n"
        "- Accurately understand patient questions and provide relevant answers.\n"
        "- Clearly and concisely explain complex medical knowledge.\n"
        "- Proactively inquire about the patient's condition when necessary.\n"
        "2. Fluency:\n"
        "- Ensure semantic coherence with no logical errors or irrelevant information.\n"
        "- Maintain consistency in style and content.\n"
        "- Maintain a friendly, enthusiastic answering attitude.\n"
        "Note:Evaluate based on the importance of Professionalism > fluency. If there's a conflict, prioritize the "
        "former.\n"
        "Output Format:Based on the above criteria, judge the result of \"Answer1\" relative to \"Answer2\". "
        "Output as: Win, Lose, Tie.")}]
    assert "safety" not in msgs[0]["content"].lower()


def test_templates_reach_the_judge_and_are_checked():
    j = Recorder(['{"fluency": 4, "relevance": 5, "completeness": 3, "proficiency": 4}'])
    out = judge_pointwise(j, [CONV], ["Paracetamol."], ["Rest."], template="medcare")
    assert out["summary"]["means"] == {"fluency": 4.0, "relevance": 5.0, "completeness": 3.0, "proficiency": 4.0}
    assert j.sent[0][0]["content"].startswith("You are an AI evaluator")
    j = Recorder(["Win", "Lose"])
    res = judge_pair(j, CONV, "a", "b", template="iimedgpt")
    assert res["verdict"] == "win" and "Answer1:a Answer2:b" in j.sent[0][0]["content"]
    assert "Answer1:b Answer2:a" in j.sent[1][0]["content"]  # the swapped order
    assert "Question:user: I have had" in j.sent[0][0]["content"]  # multi-turn: the dialogue is the question
    with pytest.raises(ValueError, match="judge.template must be one of medpipe, medcare, iimedgpt, got 'gpt'"):
        JudgeParams(template="gpt")
    with pytest.raises(ValueError, match="no pairwise prompt"):
        pair_messages(CONV, "a", "b", "medcare")
