"""Serving and judging: the OpenAI-compatible server on 127.0.0.1 (in-process and `medpipe serve`),
chat, the judge client, LLM-as-judge scores and pairwise verdicts through a real endpoint."""
from __future__ import annotations

import json
import sys
import time

import httpx
import pytest

from _evalrun import fake_run, samples, tiny_artifact
from conftest import REPO, medpipe, served
from medpipe.stages.inference.runtime import EndpointError, LocalModel, OpenAIClient, endpoint_base
from medpipe.commands.serve import build_app, free_port, serving


@pytest.fixture(scope="module")
def tiny_model():
    art = tiny_artifact()
    return LocalModel(art.model_path, art.tokenizer_path, name="tiny")


@pytest.fixture(scope="module")
def server(tiny_model):
    with serving(build_app(tiny_model, "tiny")) as url:
        yield url


def test_models_and_chat_completions(server):
    assert server.startswith("http://127.0.0.1:")
    models = httpx.get(f"{server}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    r = httpx.post(f"{server}/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": [{"type": "text", "text": "What is gout?"}]}],
        "max_tokens": 6}, timeout=60)
    body = r.json()
    assert r.status_code == 200 and body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] <= 6
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]


def test_greedy_is_deterministic_and_equals_local_generation(server, tiny_model):
    msgs = [{"role": "user", "content": "偏头痛如何治疗？"}]
    a = OpenAIClient(server).chat(msgs, max_tokens=8)
    b = OpenAIClient(server).chat(msgs, max_tokens=8)
    assert a == b == tiny_model.chat(msgs, max_new_tokens=8).text


def test_streaming_and_bad_requests(server, tiny_model):
    msgs = [{"role": "user", "content": "肺炎的常见症状有哪些？"}]
    with httpx.stream("POST", f"{server}/v1/chat/completions", timeout=60,
                      json={"messages": msgs, "stream": True, "max_tokens": 24, "temperature": 1.0, "seed": 0}) as r:
        lines = [x for x in r.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(x[6:]) for x in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    pieces = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    want = tiny_model.chat(msgs, max_new_tokens=24, temperature=1.0, seed=0)  # (greedy text is empty here)
    assert "".join(pieces) == want.text and chunks[-1]["choices"][0]["finish_reason"] == want.finish_reason
    assert len(pieces) > 1  # sent as decoded, not as one block at the end
    for bad, why in (({"messages": []}, "non-empty"), ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
                     ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n > 1"),
                     ):
        r = httpx.post(f"{server}/v1/chat/completions", json=bad)
        assert r.status_code == 400 and why in r.json()["error"]["message"], r.text
    r = httpx.post(f"{server}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "'max_tokens' must be an integer, got \"many\""
    assert httpx.post(f"{server}/v1/chat/completions", content=b"not json").status_code == 400


def test_rag_prepends_passages_to_the_last_user_turn():
    from medpipe.stages.inference.runtime import Completion

    class Recorder:
        rendered = []

        def render(self, messages):
            self.rendered.append(messages)
            return "prompt"

        def generate(self, prompts, **kw):
            return [Completion("ok", "stop", 1, 1)]

    class Retriever:
        k = 2

        def search(self, queries, k):
            return [[{"text": "偏头痛一线治疗为曲普坦。"}, {"text": "痛风用秋水仙碱。"}] for _ in queries]

    model = Recorder()
    with serving(build_app(model, "m", Retriever())) as url:
        OpenAIClient(url).chat([{"role": "user", "content": "偏头痛怎么治？"}])
    last = model.rendered[-1][-1]["content"]
    assert last.startswith("参考资料：\n[1] 偏头痛一线治疗为曲普坦。\n[2] 痛风用秋水仙碱。") and last.endswith("偏头痛怎么治？")


def test_endpoint_urls_and_unreachable_endpoints():
    assert endpoint_base("http://h:1") == endpoint_base("http://h:1/v1/") == "http://h:1/v1"
    assert endpoint_base("http://h:1/v1/chat/completions") == "http://h:1/v1"
    with pytest.raises(EndpointError, match=r"127\.0\.0\.1.*unreachable"):
        OpenAIClient(f"http://127.0.0.1:{free_port()}", timeout=5).check()


class ScriptedJudge:
    """A judge client replying from a script (pairwise logic without a model)."""

    def __init__(self, replies):
        self.replies = list(replies)

    def chat(self, messages, max_tokens=16, temperature=0.0):
        return self.replies.pop(0)


def test_pairwise_verdicts_both_orders_and_summary_line():
    from medpipe.stages.evaluation.judge import judge_pair, pairwise_line, pairwise_summary

    conv = [{"role": "user", "content": "q"}]
    results = [judge_pair(ScriptedJudge(r), conv, "a", "b") for r in (
        ["Win", "Lose"],    # consistent win for a
        ["Lose", "Win"],    # consistent lose
        ["Tie", "Tie"],     # tie
        ["Win", "Win"],     # position bias: inconsistent → tie
        ["Win", "I cannot decide"],  # malformed: not judged
    )]
    assert [r["verdict"] for r in results] == ["win", "lose", "tie", "tie", None]
    s = pairwise_summary(results)
    assert s["judged"] == 4 and s["malformed"] == 1 and s["inconsistent"] == 1
    assert (s["win"], s["tie"], s["lose"]) == (0.25, 0.5, 0.25)
    assert pairwise_line("dpo", "sft", s).startswith("dpo vs sft: 25 % win, 50 % tie, 25 % lose")


def test_chat_one_shot_and_interactive(tmp_path, server):
    run_dir = fake_run(tmp_path)
    r = medpipe("chat", str(run_dir), "--stage", "sft", "-m", "What is asthma?", "--max-new-tokens", "4")
    assert r.code == 0, r.out
    r = medpipe("chat", "--url", server, "-m", "hi", "--max-new-tokens", "4")
    assert r.code == 0, r.out
    from medpipe.commands.chat import chat_loop

    said, typed = [], iter(["hello", "/reset", "again", "/exit"])
    chat_loop(str(run_dir), "sft", None, True, None, None, "You are a doctor.", 4, 0.0,
              input_fn=lambda _: next(typed), print_fn=said.append)
    banner = next(m for m in said if m.startswith("medpipe chat with"))
    assert banner.startswith("medpipe chat with sft") and "+ RAG" in banner
    assert sum(m.startswith("model> ") for m in said) == 2

    # at a terminal the answers are written as they are decoded: pieces joined = the plain answer
    import io

    out, typed = io.StringIO(), iter(["What is asthma?", "/exit"])
    chat_loop(str(run_dir), "sft", None, False, None, None, None, 24, 1.0,
              input_fn=lambda _: next(typed), print_fn=lambda m: None, stream_to=out, seed=0)
    plain = []
    chat_loop(str(run_dir), "sft", "What is asthma?", False, None, None, None, 24, 1.0, print_fn=plain.append, seed=0)
    assert out.getvalue().startswith("model> ") and out.getvalue().endswith("\n")
    assert out.getvalue()[len("model> "):-1] == plain[0]


@pytest.mark.slow
def test_medpipe_serve_is_the_judge_endpoint(tmp_path):
    """`medpipe serve` on the tiny model at 127.0.0.1 judges an eval set and a pairwise comparison;
    its replies are not valid verdicts, so they are counted as malformed, never guessed."""
    run_dir = fake_run(tmp_path)
    with served(run_dir, "sft", 240, 120) as url:
        r = medpipe("eval", str(run_dir), "--stage", "dpo", "limit=3", "max_new_tokens=8", f"judge.url={url}",
                    "judge.max_tokens=24", f"data={{path: {samples()}/sft_alpaca.json, format: alpaca}}")
        assert r.code == 0, r.out
        res = json.loads((run_dir / "eval" / "dpo.json").read_text())["results"]["sft_alpaca@generate"]
        assert res["judge"]["n"] == 3 and res["judge"]["scored"] + res["judge"]["malformed"] == 3
        assert res["metrics"]["judge_malformed"] == res["judge"]["malformed"]
        r = medpipe("compare", str(run_dir), "--a", "dpo", "--b", "sft", "--judge-url", url, "--max-new-tokens", "6",
                    f"data={{path: {samples()}/sft_sharegpt.json, format: sharegpt, limit: 3}}")
        assert r.code == 0, r.out
        pw = json.loads((run_dir / "eval" / "pairwise-dpo-vs-sft.json").read_text())
        assert pw["summary"]["n"] == 3 and pw["summary"]["judged"] + pw["summary"]["malformed"] == 3
        assert any(it["turns"] > 1 for it in pw["items"])  # multi-turn dialogues: history kept
        assert "dpo vs sft:" in r.out and "inconsistent" in r.out
