"""The eval stage on the tiny model: the three mcq methods, batching = one at a time, k-shot,
generation metrics, PromptCBLUE, bad input, `medpipe eval` on a run dir."""
from __future__ import annotations

import json

import pytest

from _evalrun import fake_run, samples, tiny_artifact
from conftest import medpipe
from medpipe.stages.eval import EvalParams
from medpipe.stages.evaluation.prompts import cue_prompt, pick_shots, with_context
from medpipe.stages.evaluation.runner import eval_mcq, evaluate
from medpipe.stages.evaluation.scoring import letter_logits
from medpipe.stages.evaluation.sets import EvalSet, plan_sets

QUIET = dict(say=lambda m: None)


def cmexam(limit=12):
    return {"path": f"{samples()}/mcq_cmexam.csv", "format": "cmexam", "limit": limit}


@pytest.fixture(scope="module")
def runner():
    from medpipe.stages.inference.backends import open_backend

    return open_backend(tiny_artifact())


def test_cue_scoring_batched_equals_one_at_a_time(runner):
    items = plan_sets(EvalParams(data=[cmexam(10), {"path": f"{samples()}/mcq_medqa.jsonl", "format": "medqa",
                                                    "limit": 10}]))
    items = items[0].records + items[1].records  # different lengths, 4 and 5 options, zh and en
    prompts = [cue_prompt(it, "auto", []) for it in items]
    letters = [list(it["options"]) for it in items]
    batched = letter_logits(runner.model, runner.tok, prompts, letters, batch_size=8)
    single = letter_logits(runner.model, runner.tok, prompts, letters, batch_size=1)
    for b, s in zip(batched, single):
        assert b.keys() == s.keys()
        for k in b:
            assert b[k] == pytest.approx(s[k], abs=1e-4)


def test_prefix_groups_split_on_shared_tokens_only():
    from medpipe.stages.inference.prefix import prefix_groups

    shots_a, shots_b = list(range(100, 160)), list(range(200, 240))
    enc = [shots_a + [1, 2], [7, 8, 9], shots_b + [5], shots_a + [3], shots_b + [6, 6, 6], shots_a + [1, 4],
           shots_a[:10] + [9] * 40]                      # shares 10 tokens only: plain path
    groups = prefix_groups(enc, min_prefix=32, min_saved=0)
    assert sorted(k for _, ks in groups for k in ks) == list(range(len(enc)))  # each prompt once
    by_first = {ks[0]: (p, sorted(ks)) for p, ks in groups}
    assert (60, [0, 3, 5]) in by_first.values() and (40, [2, 4]) in by_first.values()
    assert (0, [1, 6]) in [(p, sorted(ks)) for p, ks in groups]
    assert all(p < len(enc[k]) for p, ks in groups for k in ks)  # every prompt keeps a token to score
    # a prompt that IS the shared prefix of another still keeps one token of its own
    assert prefix_groups([shots_a, shots_a + [1]], min_prefix=32, min_saved=0) == [(59, [0, 1])]
    # by default a group must save enough prefix tokens to pay for its extra forwards
    assert prefix_groups(enc) == [(0, sorted(range(len(enc)), key=lambda k: enc[k]))]
    assert prefix_groups([shots_a + [i] for i in range(10)])[0][0] == 60  # 9 × 60 tokens saved


def test_kshot_shared_prefix_equals_independent_rows(runner):
    """k-shot prompts: the shared shots run once through the KV cache; the letters' logits equal
    scoring each prompt on its own (zero-shot prompts mixed in take the plain path)."""
    from medpipe.stages.inference.prefix import prefix_groups

    ceval = plan_sets(EvalParams(data={"path": f"{samples()}/ceval_val.csv", "format": "ceval", "limit": 12}))
    pool = plan_sets(EvalParams(data={"path": f"{samples()}/ceval_dev.csv", "format": "ceval"}))[0].records
    items = ceval[0].records + plan_sets(EvalParams(data=cmexam(5)))[0].records
    prompts = [cue_prompt(it, "auto", pick_shots(it, pool, 3) if i < 12 else []) for i, it in enumerate(items)]
    letters = [list(it["options"]) for it in items]
    tok, model = runner.tok, runner.model
    groups = prefix_groups([tok(p)["input_ids"] for p in prompts])
    assert groups[0][0] > 100 and len(groups[0][1]) == 12 and groups[-1] == (0, groups[-1][1])
    shared = letter_logits(model, tok, prompts, letters, batch_size=5)       # the group spans 3 batches
    single = letter_logits(model, tok, prompts, letters, batch_size=1, share_prefix=False)
    for a, b in zip(shared, single):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-4)


@pytest.mark.parametrize("method", ["cue", "ppl", "generate"])
def test_each_mcq_method_scores_the_set(method, tmp_path):
    p = EvalParams(data=cmexam(8), method=method, mcq_max_new_tokens=4)
    metrics, results = evaluate(p, tiny_artifact(), tmp_path, **QUIET)
    r = results["cmexam"]
    assert r["n"] == 8 and r["method"] == method and r["protocol"] == "native"
    rows = [json.loads(x) for x in (tmp_path / "details" / "cmexam.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(x["_loc"].startswith(f"{samples()}/mcq_cmexam.csv:") for x in rows)
    # accuracy is the share of items whose predicted letter set is the gold set
    assert all(x["correct"] == (x["pred"] is not None and sorted(x["pred"]) == sorted(x["gold"])) for x in rows)
    assert metrics["cmexam/acc"] == sum(x["correct"] for x in rows) / 8
    assert sum(s["n"] for s in r["subjects"].values()) == 8
    assert all(len(x["prompt_sha"]) == 16 and x["protocol"] == "native" for x in rows)
    if method == "generate":
        assert metrics["cmexam/invalid"] == sum(x["pred"] is None for x in rows)
    else:  # every option's score, token count and characters; the prediction is the best score
        best = min if method == "ppl" else max
        assert all(x["pred"] == [best(x["scores"], key=x["scores"].get)] for x in rows)
        assert all(x["scores"].keys() == x["n_tokens"].keys() == x["chars"].keys() for x in rows)


class CannedRunner:
    """Stands in for the eval backend: generate() returns given texts (method=generate)."""
    model = None
    tok = None
    has_template = False

    def __init__(self, texts):
        self.texts = texts

    def generate(self, prompts, max_new_tokens, add_special_tokens):
        assert all(p.endswith("答案为") or p.endswith("The answer is") for p in prompts)
        return self.texts[: len(prompts)]


def test_generate_method_multi_answer_and_unknown_letters():
    items = [{"id": "1", "question": "多选？", "options": {"A": "a", "B": "b", "C": "c"}, "answer": ["A", "C"]},
             {"id": "2", "question": "多选？", "options": {"A": "a", "B": "b", "C": "c"}, "answer": ["A", "C"]},
             {"id": "3", "question": "单选？", "options": {"A": "a", "B": "b", "C": "c"}, "answer": ["B"]},
             {"id": "4", "question": "单选？", "options": {"A": "a", "B": "b", "C": "c"}, "answer": ["B"]}]
    s = EvalSet("x", "mcq", "cmexam", items)
    res, details = eval_mcq(s, EvalParams(method="generate"), CannedRunner(["AC", "A", "F", "B。"]), [], None)
    assert [d["pred"] for d in details] == [["A", "C"], ["A"], None, ["B"]]
    assert [d["correct"] for d in details] == [True, False, False, True]
    assert details[2]["invalid"] == "unknown_letter"
    assert res["metrics"]["acc"] == 0.5 and res["invalid"] == 1 and res["acc_multi"] == 0.5


def test_kshot_examples_come_from_the_dev_split_same_subject_first():
    dev = plan_sets(EvalParams(data=f"{samples()}/ceval_dev.csv"))[0].records
    item = plan_sets(EvalParams(data=f"{samples()}/ceval_val.csv"))[0].records[0]
    shots = pick_shots(item, dev, 5)
    assert len(shots) == 5 and all(s["subject"] == item["subject"] for s in shots)
    prompt = cue_prompt(item, "auto", shots)
    assert prompt.count("答案为") == 6 and prompt.endswith("答案为")
    assert all(f"答案为{''.join(s['answer'])}\n\n" in prompt for s in shots)
    assert pick_shots(shots[0], shots, 5) == shots[1:]  # never the item itself


def test_ceval_five_shot_runs(tmp_path):
    p = EvalParams(data=f"{samples()}/ceval_val.csv", shots=5, fewshot_data=f"{samples()}/ceval_dev.csv", limit=6)
    metrics, results = evaluate(p, tiny_artifact(), tmp_path, **QUIET)
    assert results["ceval"]["shots"] == 5 and results["ceval"]["n"] == 6
    rows = [json.loads(x) for x in (tmp_path / "details" / "ceval.jsonl").read_text().splitlines()]
    assert metrics["ceval/acc"] == sum(x["correct"] for x in rows) / 6


def test_rag_passages_go_into_the_prompt():
    item = {"question": "偏头痛怎么治疗？", "options": {"A": "x", "B": "y"}, "answer": ["A"]}
    prompt = cue_prompt(with_context(item, "参考资料：\n[1] 偏头痛用曲普坦。"), "auto", [])
    assert prompt.startswith("背景：参考资料：\n[1] 偏头痛用曲普坦。\n问题：偏头痛怎么治疗？")


def test_generation_set_bleu_rouge(tmp_path):
    p = EvalParams(data={"path": f"{samples()}/sft_alpaca.json", "format": "alpaca", "limit": 4},
                   max_new_tokens=8, tokenize="jieba")
    metrics, results = evaluate(p, tiny_artifact(), tmp_path, **QUIET)
    assert set(metrics) == {f"sft_alpaca/{k}" for k in ("bleu1", "bleu4", "rouge1", "rouge2", "rougeL")}
    assert results["sft_alpaca"]["tokenize"] == "jieba"
    rows = [json.loads(x) for x in (tmp_path / "details" / "sft_alpaca.jsonl").read_text().splitlines()]
    assert all(r["reference"] for r in rows)


def test_promptcblue_set(tmp_path):
    data = tmp_path / "cblue.jsonl"
    rows = [{"input": "判断问题意图：头痛吃什么药？\n选项：病情诊断，治疗方案\n答：", "target": "治疗方案",
             "answer_choices": ["病情诊断", "治疗方案"], "task_type": "cls", "task_dataset": "KUAKE-QIC", "sample_id": "1"},
            {"input": "根据对话生成回复：医生你好，我头痛。", "target": "建议休息并测量血压。", "answer_choices": None,
             "task_type": "response_generation", "task_dataset": "MedDG", "sample_id": "2"}]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    metrics, results = evaluate(EvalParams(data=str(data), max_new_tokens=8), tiny_artifact(), tmp_path, **QUIET)
    assert set(metrics) == {"cblue/score", "cblue/KUAKE-QIC_macro_f1", "cblue/MedDG_rougeL"}
    assert results["cblue"]["kind"] == "promptcblue"


# --- bad input ----------------------------------------------------------------------------------
def test_bad_input_is_refused_with_a_clear_error(tmp_path):
    from medpipe.data import DataError

    noref = tmp_path / "noref.jsonl"
    noref.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match="noref.jsonl:1.*expected an assistant turn"):
        plan_sets(EvalParams(data=str(noref)))
    unlabeled = tmp_path / "clinical_medicine_test.csv"
    unlabeled.write_text("id,question,A,B,C,D\n0,问题？,a,b,c,d\n")
    with pytest.raises(DataError, match="no reference answers"):
        plan_sets(EvalParams(data=str(unlabeled)))
    bad_letter = tmp_path / "bad.jsonl"
    bad_letter.write_text(json.dumps({"question": "q?", "options": {"A": "x", "B": "y"}, "answer_idx": "F",
                                      "answer": "z"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:1.*unknown answer letter 'F'"):
        plan_sets(EvalParams(data={"path": str(bad_letter), "format": "medqa"}))
    with pytest.raises(DataError, match="cannot be evaluated"):
        plan_sets(EvalParams(data=f"{samples()}/pretrain.jsonl"))
    # params are checked when they are made (binding a recipe or `medpipe eval` overrides)
    with pytest.raises(ValueError, match="method must be one of ppl, cue, generate, generate_then_cue, got 'vote'"):
        EvalParams(data=cmexam(), method="vote")
    with pytest.raises(ValueError, match="fewshot_data must be set when shots=5"):
        EvalParams(data=cmexam(), shots=5)
    from medpipe.stages.evaluation.rag import RagParams

    with pytest.raises(ValueError, match="rag.k must be >= 1, got 0"):
        RagParams(k=0)


def test_vllm_backend_without_vllm_is_a_clear_error(tmp_path):
    import importlib.util

    from medpipe.errors import ConfigError

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed")
    with pytest.raises(ConfigError, match="vLLM is not installed"):
        evaluate(EvalParams(data=cmexam(), backend="vllm"), tiny_artifact(), tmp_path, **QUIET)


class FakeVLLM:
    """Stands in for the `vllm` package (not installable here): LLM.generate over token-id prompts
    computed with transformers, returning vLLM's output shapes (outputs[0].text, prompt_logprobs as
    [None, {token: Logprob}, ...])."""

    class SamplingParams:
        def __init__(self, max_tokens=16, temperature=1.0, prompt_logprobs=None, **kw):
            self.max_tokens, self.temperature, self.prompt_logprobs = max_tokens, temperature, prompt_logprobs

    class LLM:
        requests: list = []

        def __init__(self, model, tokenizer=None, trust_remote_code=False, **limits):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.model = AutoModelForCausalLM.from_pretrained(model).eval()
            self.tok = AutoTokenizer.from_pretrained(tokenizer or model)

        def generate(self, prompts, params):
            from types import SimpleNamespace as NS

            import torch

            outs = []
            for pr in prompts:
                ids = pr["prompt_token_ids"]  # token prompts only: medpipe tokenises itself
                FakeVLLM.LLM.requests.append(ids)
                x = torch.tensor([ids])
                with torch.no_grad():
                    if params.prompt_logprobs is not None:
                        lp = self.model(x).logits[0].log_softmax(-1)
                        plp = [None] + [{ids[i]: NS(logprob=float(lp[i - 1, ids[i]]))} for i in range(1, len(ids))]
                        outs.append(NS(prompt_logprobs=plp, outputs=[NS(text="")]))
                    else:
                        new = self.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                                  max_new_tokens=params.max_tokens)[0, len(ids):]
                        outs.append(NS(prompt_logprobs=None, outputs=[NS(text=self.tok.decode(new, skip_special_tokens=True))]))
            return outs


def test_vllm_backend_plumbing_with_a_stand_in_engine(tmp_path, monkeypatch):
    """backend=vllm through a stand-in for vllm.LLM: token-id prompts tokenised as the
    transformers backend does, letters scored by prompt logprobs in one batched call, the same
    predictions and generations as backend=transformers."""
    import sys
    import types

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = FakeVLLM.LLM, FakeVLLM.SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", fake)
    FakeVLLM.LLM.requests.clear()
    for method in ("cue", "generate"):
        kw = dict(data=cmexam(5), method=method, mcq_max_new_tokens=3, batch_size=1)
        _, got = evaluate(EvalParams(backend="vllm", **kw), tiny_artifact(), tmp_path / f"v{method}", **QUIET)
        _, want = evaluate(EvalParams(**kw), tiny_artifact(), tmp_path / f"t{method}", **QUIET)
        rows = lambda d: [json.loads(x) for x in (d / "details" / "cmexam.jsonl").read_text().splitlines()]
        assert [r["pred"] for r in rows(tmp_path / f"v{method}")] == [r["pred"] for r in rows(tmp_path / f"t{method}")]
        assert got["cmexam"]["metrics"]["acc"] == want["cmexam"]["metrics"]["acc"]
    items = plan_sets(EvalParams(data=cmexam(5)))[0].records
    from medpipe.stages.models.loader import load_tokenizer

    tok = load_tokenizer(tiny_artifact().tokenizer_path)
    first = tok(cue_prompt(items[0], "auto", []))["input_ids"]
    assert FakeVLLM.LLM.requests[0][:-1] == first  # the prompt's own tokens + one candidate letter


def test_unreachable_judge_fails_before_any_generation(tmp_path):
    from medpipe.stages.inference.runtime import EndpointError
    from medpipe.commands.serve import free_port

    p = EvalParams(data={"path": f"{samples()}/sft_alpaca.json", "format": "alpaca", "limit": 2})
    p.judge.url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    p.judge.timeout = 5
    with pytest.raises(EndpointError, match="unreachable.*Nothing was evaluated"):
        evaluate(p, tiny_artifact(), tmp_path, **QUIET)
    assert not (tmp_path / "details").exists()


# --- the stage and the CLI ----------------------------------------------------------------------
def test_eval_params_compose_and_reject_unknown_keys():
    from medpipe.compose import bind_stages, compose
    from medpipe.errors import ConfigError

    recipe = "tests/recipes/qilin_eval.yaml"
    cfg, _ = compose(recipe, [])
    from medpipe.stages.evaluation.rag import RagParams

    plans = {p.name: p for p in bind_stages(cfg)}
    assert plans["eval_sft"].source == "sft" and isinstance(plans["eval_sft"].params, EvalParams)
    assert isinstance(plans["eval_sft"].params.rag, RagParams) and plans["eval_sft"].cls.trains is False
    with pytest.raises(ConfigError, match="bogus"):
        bind_stages(compose(recipe, ["+stages.eval_sft.bogus=1"])[0])
    # range checks at bind time, by the mechanism the training params use, nested ones named
    with pytest.raises(ConfigError, match=r"stages.eval_sft: method must be one of ppl, cue, generate, generate_then_cue, got 'vote'"):
        bind_stages(compose(recipe, ["stages.eval_sft.method=vote"])[0])
    with pytest.raises(ConfigError, match=r"rag.chunk_overlap must be in \[0, chunk_size\), got 300"):
        bind_stages(compose(recipe, ["stages.eval_sft.rag.chunk_overlap=300"])[0])


def test_medpipe_eval_writes_and_merges_results_for_a_stage(tmp_path):
    run_dir = fake_run(tmp_path)
    r = medpipe("eval", str(run_dir), "--stage", "sft", "data=cmexam", "limit=6")
    assert r.code == 0, r.out
    rec = json.loads((run_dir / "eval" / "sft.json").read_text())
    assert rec["evaluated_stage"] == "sft" and set(rec["metrics"]) == {"cmexam@cue/acc", "cmexam@cue/f1_weighted"}
    assert rec["params"]["cmexam@cue"]["limit"] == 6 and rec["results"]["cmexam@cue"]["n"] == 6
    first = rec["results"]["cmexam@cue"]
    r = medpipe("eval", str(run_dir), "--stage", "sft", "data=${data.cmexam}", "limit=6", "method=ppl",
                "rag.index=pretrain")
    assert r.code == 0, r.out
    rec = json.loads((run_dir / "eval" / "sft.json").read_text())
    assert {"cmexam@cue/acc", "cmexam+rag@ppl/acc"} <= set(rec["metrics"])  # merged, not replaced
    # the same set under another method is a second result; the first one is untouched
    r = medpipe("eval", str(run_dir), "--stage", "sft", "data=cmexam", "limit=4", "method=ppl")
    assert r.code == 0, r.out
    rec = json.loads((run_dir / "eval" / "sft.json").read_text())
    assert rec["results"]["cmexam@cue"] == first and rec["results"]["cmexam@ppl"]["n"] == 4
    assert rec["params"]["cmexam@ppl"]["method"] == "ppl" and rec["params"]["cmexam@cue"]["method"] == "cue"
    details = run_dir / "eval" / "sft" / "details"
    assert len((details / "cmexam@cue.jsonl").read_text().splitlines()) == 6  # not overwritten by the ppl run
    assert len((details / "cmexam@ppl.jsonl").read_text().splitlines()) == 4
    assert (run_dir / "eval" / "sft" / "details" / "cmexam+rag@ppl.jsonl").is_file()
    r = medpipe("eval", str(run_dir), "--stage", "nope", "data=cmexam")
    assert r.code == 2 and "no stage 'nope'" in r.out
    r = medpipe("eval", str(run_dir), "method=vote", "data=cmexam")
    assert r.code == 2 and "method must be one of" in r.out


def test_explanations_scored_against_the_reference(tmp_path):
    p = EvalParams(data=cmexam(4), explain=True, max_new_tokens=8)
    metrics, _ = evaluate(p, tiny_artifact(), tmp_path, **QUIET)
    assert {f"cmexam/expl_{k}" for k in ("bleu1", "bleu4", "rouge1", "rouge2", "rougeL")} <= set(metrics)
    rows = [json.loads(x) for x in (tmp_path / "details" / "cmexam.jsonl").read_text().splitlines()]
    assert all("explanation_output" in r for r in rows)
    from medpipe.data import DataError

    with pytest.raises(DataError, match="no item has an explanation"):
        evaluate(EvalParams(data={"path": f"{samples()}/ceval_val.csv", "limit": 2}, explain=True), tiny_artifact(),
                 tmp_path, **QUIET)


def test_cpoly_artifact_scores_each_task_set_with_its_merged_model(tmp_path):
    """A set named after a C-Poly task is scored by that task's merged model; other sets (and
    task_models=false) by the artifact's model."""
    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny = str(ensure_tiny_path())
    other = tmp_path / "merged" / "cmexam"
    model = AutoModelForCausalLM.from_pretrained(tiny)
    with torch.no_grad():
        torch.manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # a visibly different model
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(other)
    art = dataclasses.replace(tiny_artifact(), stage="cpoly", task_models={"cmexam": str(other)})
    data = [cmexam(6), {"path": f"{samples()}/mcq_medqa.jsonl", "format": "medqa", "limit": 6}]
    said = []

    def scores(a, out, **kw):
        _, results = evaluate(EvalParams(data=data, method="cue", **kw), a, out, say=said.append)
        rows = {n: [json.loads(x)["scores"] for x in (out / "details" / f"{n}.jsonl").read_text().splitlines()]
                for n in ("cmexam", "medqa")}
        return results, rows

    results, rows = scores(art, tmp_path / "a")
    _, on_other = scores(dataclasses.replace(tiny_artifact(), model_path=str(other), tokenizer_path=str(other)),
                         tmp_path / "b")
    _, on_base = scores(tiny_artifact(), tmp_path / "c")
    assert rows["cmexam"] == on_other["cmexam"] and rows["cmexam"] != on_base["cmexam"]
    assert rows["medqa"] == on_base["medqa"]
    assert results["cmexam"]["task_model"] == str(other) and "task_model" not in results["medqa"]
    assert any("merged for task 'cmexam'" in m for m in said)
    _, off = scores(art, tmp_path / "d", task_models=False)
    assert off["cmexam"] == on_base["cmexam"]


def ensure_tiny_path():
    from medpipe.stages.models.tiny import ensure_tiny

    return ensure_tiny()
