"""`medpipe serve` as unmodified OpenAI clients see it: the official `openai` SDK (chat, stop strings,
logprobs, /v1/completions with echo and token-id prompts, stream_options.include_usage, refusals by
name, 400 for bad values, /v1/models/{id}) on both batching paths; clients that go away stop their
generation within a step; SIGINT ends the process; lm-eval 0.4.13 as a client (`local-completions`
log-likelihoods equal `protocol=lm-eval`'s, `local-chat-completions` generate_until with its `until`
as stop)."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from medpipe.commands.serve import Limits, build_app, serving
from test_serve_limits import questions, varied_tiny

openai = pytest.importorskip("openai", reason="the openai SDK is in the test extra")


@pytest.fixture(scope="module")
def model():
    return varied_tiny()


@pytest.fixture(scope="module", params=["continuous", "static"])
def served(request, model):
    app = build_app(model, "tiny", limits=Limits(batching=request.param))
    assert app.state.batching == request.param
    with serving(app) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0), url


def long_answer(model, n=40):
    """A question whose greedy answer runs `n` tokens without a stop token, and that answer."""
    for q in questions(12):
        msgs = [{"role": "user", "content": q}]
        c = model.chat(msgs, max_new_tokens=n)
        if c.finish_reason == "length" and len(c.text) > 20:
            return msgs, c
    raise AssertionError("no long greedy answer among the questions")


def token_boundary_stop(model, msgs, text):
    """A 4-character stop string that spans two generated tokens, and where it begins in the text."""
    ids = model.encode(model.render(msgs))
    gen = model.generate_ids([ids], max_new_tokens=40)[0]
    toks = model.tok(text, add_special_tokens=False)["input_ids"]
    pieces = [model.tok.decode([t]) for t in toks]
    at = 0
    for p in pieces[:-1]:
        at += len(p)
        if 6 <= at < len(text) - 4 and len(p) >= 2 and text[at - 2:at + 2].strip() == text[at - 2:at + 2]:
            stop = text[at - 2:at + 2]
            if text.find(stop) == at - 2:
                return stop, at - 2
    raise AssertionError(f"no stop string across tokens in {text!r} ({gen})")


def test_stop_strings_end_at_the_string_streamed_or_not(served, model):
    client, _ = served
    msgs, full = long_answer(model)
    stop, at = token_boundary_stop(model, msgs, full.text)
    want = full.text[:at].rstrip()
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=40, stop=[stop, "never-said"])
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < full.completion_tokens
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=40, stop=stop, stream=True,
                                                 stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == want  # (pieces coalesce when the client reads slower than tokens come)
    assert all(stop[:2] not in p for p in pieces[-1:]) and stop[0] not in "".join(pieces)[len(want):]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == r.usage.completion_tokens
    assert last.usage.prompt_tokens == r.usage.prompt_tokens and all(c.usage is None for c in chunks[:-1])


def three_token_stop(model, ids):
    """A stop string from the last character of one generated token through the whole next one into
    the first character of the one after it, and the tokens generated before it ends."""
    gen = model.generate_ids([ids], max_new_tokens=40)[0]
    toks = model.tok(gen.text, add_special_tokens=False)["input_ids"]
    pieces = [model.tok.decode([t]) for t in toks]
    at = 0
    for a, b, c in zip(pieces, pieces[1:], pieces[2:]):
        at += len(a)
        stop = a[-1:] + b + c[:1]
        if at > 4 and len(stop) >= 3 and stop.strip() == stop and gen.text.find(stop) == at - 1:
            return stop
    raise AssertionError(f"no stop string over three tokens in {gen.text!r}")


def test_streamed_logprobs_stop_where_the_text_stops_for_a_slow_reader(model):
    """A streamed chat with logprobs and a stop string whose reader falls behind (the token lists so
    far coalesce, the newest holding tokens of the stop string) carries exactly the non-streamed
    answer's entries: none for a token of the stop string the text never showed. Before the fix the
    stream sent one entry per token decoded, the held-back ones included."""
    import asyncio

    from medpipe.commands.serve_openai import chat_logprobs, sse
    from medpipe.commands.serve_requests import ApiError
    from medpipe.stages.inference.continuous import ContinuousEngine

    msgs, _ = long_answer(model)
    ids = model.encode(model.render(msgs))
    stop = three_token_stop(model, ids)
    engine = ContinuousEngine(model)
    try:
        whole = engine.submit(ids, 40, stop=(stop,), logprobs=2).future.result(timeout=60)
        assert whole.finish_reason == "stop" and len(whole.logprobs) == whole.completion_tokens

        async def streamed():
            pieces = engine.stream(ids, 40, stop=(stop,), logprobs=2)
            await asyncio.to_thread(pieces.req.future.result, 60)  # the reader comes back after the end
            req = {"include_usage": False, "logprobs": 2, "echo": False}
            return [e async for e in sse("chat", model.tok, {}, pieces, ApiError(503, "t", "t"), req,
                                         pieces.new_logprobs)]

        events = [json.loads(e[6:]) for e in asyncio.run(streamed()) if e.startswith("data: {")]
    finally:
        engine.close()
    got = [e for ev in events if ev["choices"][0]["logprobs"] for e in ev["choices"][0]["logprobs"]["content"]]
    want = chat_logprobs(model.tok, whole.logprobs)["content"]
    # the same tokens and alternatives; the values within 1e-4 (the second request's prompt shares the
    # first's cached prefix, computed in another forward: they differ in the 6th digit)
    assert [(e["token"], [t["token"] for t in e["top_logprobs"]]) for e in got] == \
        [(e["token"], [t["token"] for t in e["top_logprobs"]]) for e in want]
    assert all(abs(a["logprob"] - b["logprob"]) <= 1e-4 for a, b in zip(got, want))
    assert "".join(ev["choices"][0]["delta"].get("content", "") for ev in events) == whole.text


def reference_logprobs(model, ids: list[int], gen: list[int]):
    """log_softmax of one plain forward over prompt + generated tokens: per generated token (logprob, top-3 ids)."""
    import torch

    with torch.no_grad():
        logits = model.model(input_ids=torch.tensor([ids + gen])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    rows = lp[len(ids) - 1:len(ids) - 1 + len(gen)]
    return [(rows[i, t].item(), rows[i].topk(3).indices.tolist()) for i, t in enumerate(gen)], lp


def test_chat_logprobs_are_the_choosing_forwards_distribution(served, model):
    client, _ = served
    msgs, full = long_answer(model)
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 12
    ids = model.encode(model.render(msgs))
    ref, _ = reference_logprobs(model, ids, _greedy_ids(model, ids, 12))
    for e, (lp, top) in zip(content, ref):
        assert abs(e.logprob - lp) <= 1e-4
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == e.logprob  # greedy: the chosen is the top
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert e.top_logprobs[0].token == model.tok.decode([top[0]])
    assert "".join(e.token for e in content).strip() == r.choices[0].message.content
    plain = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content


def _greedy_ids(model, ids, n):
    import torch

    with torch.no_grad():
        out = model.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                   pad_token_id=model.tok.pad_token_id or 0)
    return out[0, len(ids):].tolist()


def test_completions_echo_logprobs_score_the_prompt(served, model):
    client, _ = served
    texts = ["头痛发热咳嗽三天，", "Question: what is gout?\nAnswer:"]
    r = client.completions.create(model="tiny", prompt=texts, max_tokens=0, echo=True, logprobs=2)
    assert [c.index for c in r.choices] == [0, 1] and [c.text for c in r.choices] == texts
    for c, text in zip(r.choices, texts):
        ids = model.tok(text)["input_ids"]
        _, lp = reference_logprobs(model, ids, [])
        assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
        assert len(c.logprobs.token_logprobs) == len(ids)
        for i in range(1, len(ids)):
            assert abs(c.logprobs.token_logprobs[i] - lp[i - 1, ids[i]].item()) <= 1e-4
            assert max(c.logprobs.top_logprobs[i].values()) == pytest.approx(lp[i - 1].max().item(), abs=1e-4)
        assert c.logprobs.text_offset == [len(model.tok.decode(ids[:i])) for i in range(len(ids))]
        assert c.finish_reason == "length"
    assert r.usage.completion_tokens == 0
    # lm-eval's shape: token ids, max_tokens 1, echo + logprobs 1 → prompt scores then the one generated token
    ids = model.tok(texts[1])["input_ids"]
    r = client.completions.create(model="tiny", prompt=[ids], max_tokens=1, echo=True, logprobs=1, temperature=0)
    lps = r.choices[0].logprobs.token_logprobs
    assert len(lps) == len(ids) + 1 and r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 1
    plain = client.completions.create(model="tiny", prompt=texts[1], max_tokens=6)
    assert plain.choices[0].logprobs is None and not plain.choices[0].text.startswith(texts[1])
    want = model.generate_ids([ids], max_new_tokens=6, strip=False)[0]
    assert plain.choices[0].text == want.text  # raw text: not stripped as chat's is


def test_a_long_prompt_prefilled_in_chunks_is_scored_whole(served, model):
    """A prompt over the engine's 256-token prefill chunk: each chunk's last logits score the next
    chunk's first token, so every prompt token is scored as one plain forward scores it."""
    client, _ = served
    text = "头痛发热咳嗽胸闷，" * 80
    ids = model.tok(text)["input_ids"]
    assert len(ids) > 2 * 256
    r = client.completions.create(model="tiny", prompt=text, max_tokens=2, echo=True, logprobs=0)
    _, lp = reference_logprobs(model, ids, [])
    got = r.choices[0].logprobs.token_logprobs
    assert len(got) == len(ids) + r.usage.completion_tokens and got[0] is None
    assert max(abs(got[i] - lp[i - 1, ids[i]].item()) for i in range(1, len(ids))) <= 1e-4


def test_completions_stream_and_limits_shared_with_chat(served, model):
    client, url = served
    text = "头痛发热咳嗽三天，"
    want = client.completions.create(model="tiny", prompt=text, max_tokens=8)
    chunks = list(client.completions.create(model="tiny", prompt=text, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.usage.completion_tokens
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="头痛 " * 3000, max_tokens=200)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt=text)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=[[1, 10**9]])
    assert e.value.body["param"] == "prompt" and "outside the vocabulary" in e.value.body["message"]


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]}, "messages"),
    ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]}, "messages"),
])
def test_unsupported_and_out_of_range_parameters_are_400_naming_them(served, extra, param):
    client, _ = served
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**body)
    err = e.value.body
    assert e.value.status_code == 400 and err["param"] == param and err["type"] == "invalid_request_error", err
    if param in ("response_format", "tools", "logit_bias", "presence_penalty", "frequency_penalty"):
        assert err["message"] == f"'{param}' is not supported by this server (it would be ignored)"
    if "tool_call_id" in json.dumps(extra):
        assert err["message"] == "messages[0]: role 'tool' is not supported (this server takes no tools)"


def test_developer_role_model_object_and_neutral_values(served, model):
    client, _ = served
    q = {"role": "user", "content": "偏头痛如何治疗？"}
    dev = client.chat.completions.create(model="tiny", messages=[{"role": "developer", "content": "Be brief."}, q],
                                         max_tokens=6, presence_penalty=0, logit_bias={}, response_format={"type": "text"})
    want = model.chat([{"role": "system", "content": "Be brief."}, q], max_new_tokens=6)
    assert dev.choices[0].message.content == want.text
    m = client.models.retrieve("tiny")
    assert (m.id, m.object, m.owned_by) == ("tiny", "model", "medpipe")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


# --- clients that go away -------------------------------------------------------------------------
class Counted:
    """The model's forward, slowed to 10 ms and counted."""

    def __init__(self, model):
        self.model, self.calls, self.forward = model, 0, model.model.forward

    def __enter__(self):
        def slow(*a, **kw):
            self.calls += 1
            time.sleep(0.01)
            return self.forward(*a, **kw)

        self.model.model.forward = slow
        return self

    def __exit__(self, *exc):
        self.model.model.forward = self.forward

    def settled(self, wait=1.0) -> int:
        """Forward calls once they stopped growing for `wait` s."""
        last = -1
        while last != self.calls:
            last = self.calls
            time.sleep(wait)
        return last


@pytest.mark.parametrize("temperature, stream", [(1.0, True), (1.0, False), (0.0, False), (0.0, True)])
def test_a_client_that_goes_away_frees_its_slot_within_a_step(model, temperature, stream):
    msgs = [{"role": "user", "content": questions(3)[1]}]
    app = build_app(model, "tiny")
    with serving(app) as url, Counted(model) as counted:
        body = {"messages": msgs, "max_tokens": 400, "temperature": temperature, "seed": 1, "stream": stream}
        if stream:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                while counted.calls < 20:
                    time.sleep(0.005)
                at_close = counted.calls
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/chat/completions", json=body, timeout=0.5)
            at_close = counted.calls
        total = counted.settled()
        assert total - at_close <= 3, (at_close, total)  # the step running when it left, and at most two more
        assert total < 100
        if app.state.engine is not None:
            assert app.state.engine.in_flight == 0


def test_sigint_ends_the_process_within_2s_of_finished_server_process(tmp_path):
    from _evalrun import fake_run
    from conftest import REPO

    run_dir = fake_run(tmp_path)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "medpipe.commands.cli", "serve", str(run_dir), "--stage", "sft",
                             "--port", str(port)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: [lines.append((time.monotonic(), x)) for x in proc.stdout], daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("Application startup complete" in x for _, x in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(x for _, x in lines)
            time.sleep(0.2)
        # a sampled stream in flight when the signal comes
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000,
                                "temperature": 1.0, "stream": True}) as r:
            next(r.iter_lines())
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
        ended = time.monotonic()
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=5)
    finished = [t for t, x in lines if "Finished server process" in x]
    assert finished, "".join(x for _, x in lines)
    assert ended - finished[0] < 2.0, ended - finished[0]


# --- lm-eval as a client ----------------------------------------------------------------------------
def _offline(monkeypatch, tmp_path):
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


@pytest.mark.slow
def test_lm_eval_local_completions_loglikelihoods_equal_protocol_lm_eval(tmp_path, monkeypatch):
    """`lm_eval --model local-completions` against `medpipe serve` (continuous batching) on local
    MedQA/PubMedQA tasks: every choice's log-likelihood within 1e-4 of `protocol=lm-eval`'s, same accuracy."""
    pytest.importorskip("lm_eval")
    _offline(monkeypatch, tmp_path)
    import lm_eval
    from lm_eval.tasks import TaskManager

    from _evalrun import samples, tiny_artifact
    from medpipe.stages.evaluation.protocols.lmeval_tasks import write_tasks
    from medpipe.stages.eval import EvalParams
    from medpipe.stages.evaluation.runner import evaluate
    from medpipe.stages.inference.runtime import LocalModel

    s = samples()
    files = {"medqa_4options": (f"{s}/mcq_medqa.jsonl", "medqa"), "pubmedqa": (f"{s}/pubmedqa.json", "pubmedqa")}
    names = write_tasks(tmp_path / "tasks", {t: f for t, (f, _) in files.items()})
    art = tiny_artifact()
    app = build_app(LocalModel(art.model_path, art.tokenizer_path, name="tiny"), "tiny")
    assert app.state.batching == "continuous"
    with serving(app) as url:
        ref = lm_eval.simple_evaluate(
            model="local-completions", tasks=names, log_samples=True,
            model_args=f"model=tiny,base_url={url}/v1/completions,tokenizer={art.tokenizer_path},"
                       "tokenizer_backend=huggingface,num_concurrent=4,max_retries=1,batch_size=4",
            task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    data = [{"path": f, "format": fmt, "task": t} for t, (f, fmt) in files.items()]
    metrics, _ = evaluate(EvalParams(data=data, protocol="lm-eval"), art, tmp_path / "mp", say=lambda m: None)
    worst = 0.0
    for task, name in zip(files, names):
        theirs = sorted(ref["samples"][name], key=lambda r: r["doc_id"])
        ours = [json.loads(x) for x in (tmp_path / "mp" / "details" / f"{task}.jsonl").read_text().splitlines()]
        assert len(ours) == len(theirs) > 0
        for o, t in zip(ours, theirs):
            lls = [float(x[0]) for x in t["filtered_resps"]]
            assert all(math.isfinite(x) for x in lls)
            worst = max(worst, max(abs(o["scores"][k] - ll) for k, ll in zip(list(o["scores"]), lls)))
            assert (o["pred"] == o["gold"]) == bool(t["acc"])
        assert metrics[f"{task}/acc"] == pytest.approx(ref["results"][name]["acc,none"], abs=1e-12)
    assert worst <= 1e-4, worst


GEN_TASK = """task: local_gen
dataset_path: json
dataset_kwargs:
  data_files: {{test: "{path}"}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: {until}
  max_gen_toks: 24
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.mark.slow
def test_lm_eval_local_chat_completions_generate_until_sends_until_as_stop(tmp_path, monkeypatch, model):
    """`lm_eval --model local-chat-completions --apply_chat_template` generate_until: the server ends
    each answer at the task's `until` string (what lm-eval sends as `stop`), so the harness gets the
    text before it."""
    pytest.importorskip("lm_eval")
    _offline(monkeypatch, tmp_path)
    import lm_eval
    from lm_eval.tasks import TaskManager

    qs = []
    for q in questions(12):
        full = model.chat([{"role": "user", "content": q}], max_new_tokens=24)
        if full.finish_reason == "length" and len(full.text) > 12:
            qs.append((q, full.text))
        if len(qs) == 3:
            break
    until = [t[6:9] for _, t in qs]
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps({"question": q, "answer": "x"}, ensure_ascii=False) + "\n"
                                                for q, _ in qs), encoding="utf-8")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local_gen.yaml").write_text(
        GEN_TASK.format(path=tmp_path / "gen.jsonl", until=json.dumps(until, ensure_ascii=False)), encoding="utf-8")
    with serving(build_app(model, "tiny")) as url:
        out = lm_eval.simple_evaluate(model="local-chat-completions", tasks=["local_gen"], log_samples=True,
                                      apply_chat_template=True,
                                      model_args=f"model=tiny,base_url={url}/v1/chat/completions,max_retries=1",
                                      task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    got = [r["resps"][0][0] for r in sorted(out["samples"]["local_gen"], key=lambda r: r["doc_id"])]
    want = []
    for _, text in qs:
        cut = min(i for i in (text.find(u) for u in until) if i >= 0)
        want.append(text[:cut].rstrip())
    assert got == want
