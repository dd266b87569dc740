"""Multiple-choice scoring and VoC (medpipe.stages.evaluation.scoring / prompts / voc) on a tiny random Qwen2 +
an in-memory word tokenizer. Answer-cue scoring is tested through what the eval stage's `cue` method
calls: prompts.cue_prompt + scoring.letter_logits."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from medpipe.stages.evaluation import prompts, scoring, voc

WORDS = ("Context Question Answer Options The answer is Reasoning for Think about why the Explain "
         "reasoning Which logically complete and consistent with context Check each one "
         "Verification written option Give final response in form where X of Long "
         "yes no maybe A B C D E . : ( ) , \" ? aspirin fever pain heart lung drug dose patient "
         "treat good bad cause symptom common rare blood test which what does help").split()


def tiny_tok() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")


def tiny_qwen(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    return Qwen2ForCausalLM(cfg).eval()


def biased(model: Qwen2ForCausalLM, bias: dict[int, float]) -> Qwen2ForCausalLM:
    """Give the LM head a bias so that some tokens are far more likely everywhere."""
    old = model.lm_head
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        for i, v in bias.items():
            head.bias[i] = v
    model.lm_head = head
    return model


ITEMS = [
    {"id": "q1", "question": "Which drug does help fever ?", "context": None,
     "options": {"A": "bad pain", "B": "good good good", "C": "heart lung drug dose"}, "answer": ["B"]},
    {"id": "q2", "question": "what is a common symptom", "context": "patient with blood test",
     "options": {"A": "fever", "B": "rare cause", "C": "good", "D": "lung pain"}, "answer": ["C"]},
    {"id": "q3", "question": "treat", "context": None,
     "options": {"A": "good dose", "B": "aspirin"}, "answer": ["A"]},
]


def test_option_ppl_picks_the_likely_option():
    tok = tiny_tok()
    model = biased(tiny_qwen(), {tok.convert_tokens_to_ids("good"): 12.0})
    res = scoring.score_options_ppl(ITEMS, model, tok, batch_size=4)
    assert [r["pred"] for r in res] == ["B", "C", "A"]
    flat = scoring.score_options_ppl(ITEMS, model, tok, batch_size=4, share_prompt=False)
    assert [r["pred"] for r in flat] == ["B", "C", "A"]
    assert res[0]["n_tokens"] == {"A": 2, "B": 3, "C": 4}
    assert res[0]["scores"]["B"] < 0.01 < res[0]["scores"]["A"]
    assert scoring.accuracy(ITEMS, res) == 1.0
    # summed NLL: still B (three near-certain tokens)
    assert scoring.score_options_ppl(ITEMS[:1], model, tok, reduction="sum")[0]["pred"] == "B"


def test_option_ppl_batched_equals_unbatched():
    tok = tiny_tok()
    model = tiny_qwen(1)
    one = scoring.score_options_ppl(ITEMS, model, tok, batch_size=1, share_prompt=False)
    runs = [scoring.score_options_ppl(ITEMS, model, tok, batch_size=16, share_prompt=False),
            scoring.score_options_ppl(ITEMS, model, tok, batch_size=1),     # shared prompt, 1 item/batch
            scoring.score_options_ppl(ITEMS, model, tok, batch_size=16)]    # shared prompt, all items
    for res in runs:
        for a, b in zip(one, res):
            assert a["pred"] == b["pred"]
            for k in a["scores"]:
                assert abs(a["scores"][k] - b["scores"][k]) < 1e-5
    one_sum = scoring.score_options_ppl(ITEMS, model, tok, batch_size=1, reduction="sum", share_prompt=False)
    for res in (scoring.score_options_ppl(ITEMS, model, tok, batch_size=3, reduction="sum", share_prompt=False),
                scoring.score_options_ppl(ITEMS, model, tok, batch_size=5, reduction="sum")):
        for a, b in zip(one_sum, res):
            for k in a["scores"]:
                assert abs(a["scores"][k] - b["scores"][k]) < 1e-5
    # against a plain full-sequence forward of one option
    p, conts = prompts.build_ppl_prompt(ITEMS[1])
    p_ids = tok(p)["input_ids"]
    c_ids = tok(conts["D"], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + c_ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    tgt = ids[0, 1:]
    nll = -lp[torch.arange(len(tgt)), tgt][len(p_ids) - 1:].mean()
    assert abs(float(nll) - one[1]["scores"]["D"]) < 1e-5


def cue_scores(items, model, tok, batch_size=16, chat=False):
    """The eval stage's cue method: the cue prompt, then the valid letters' next-token logits."""
    ps = [prompts.cue_prompt(it, "auto", [], tok, chat) for it in items]
    scores = scoring.letter_logits(model, tok, ps, [list(it["options"]) for it in items], batch_size,
                                   add_special_tokens=not chat)
    return [{"scores": sc, "pred": max(sc, key=sc.get)} for sc in scores]


def test_letter_cue_picks_highest_valid_letter():
    tok = tiny_tok()
    ids = tok.convert_tokens_to_ids
    model = biased(tiny_qwen(), {ids("C"): 10.0, ids("D"): 20.0})
    res = cue_scores(ITEMS, model, tok, batch_size=2)
    # D is the top token but q1 / q3 have no D (and q3 no C): best valid letter wins
    assert res[0]["pred"] == "C" and set(res[0]["scores"]) == {"A", "B", "C"}
    assert res[1]["pred"] == "D"
    assert res[2]["pred"] in {"A", "B"}
    prompt = prompts.cue_prompt(ITEMS[1])
    assert prompt == ("Context: patient with blood test\nQuestion: what is a common symptom\nOptions:\n"
                      "A. fever\nB. rare cause\nC. good\nD. lung pain\nThe answer is")
    assert prompts.cue_prompt({**ITEMS[1], "question": "哪一个是常见症状"}).endswith("答案为")


def test_letter_cue_batched_equals_unbatched():
    tok = tiny_tok()
    model = tiny_qwen(2)
    one = cue_scores(ITEMS, model, tok, batch_size=1)
    many = cue_scores(ITEMS, model, tok, batch_size=8)
    for a, b in zip(one, many):
        assert a["pred"] == b["pred"]
        for k in a["scores"]:
            assert abs(a["scores"][k] - b["scores"][k]) < 1e-4
    # the score is the letter token's logit after the prompt, as one plain forward computes it
    ids = tok(prompts.cue_prompt(ITEMS[0]))["input_ids"]
    with torch.no_grad():
        last = model(input_ids=torch.tensor([ids])).logits[0, -1]
    assert one[0]["scores"]["B"] == pytest.approx(float(last[tok.convert_tokens_to_ids("B")]), abs=1e-5)


def test_letter_token_ids_variants():
    tok = tiny_tok()
    cand = scoring.letter_token_ids(tok, ["A", "B"])
    assert cand == {"A": [tok.convert_tokens_to_ids("A")], "B": [tok.convert_tokens_to_ids("B")]}
    with pytest.raises(ValueError):  # "Z" is <unk> in this vocabulary
        scoring.letter_token_ids(tok, ["A", "Z"])


def test_parse_final_answer_is_strict():
    P = voc.parse_final_answer
    assert P("Answer: B", "ABC") == ("B", None)
    assert P("After checking, answer：(C).", "ABC") == ("C", None)
    assert P("答案：A", "ABC") == ("A", None)
    assert P("Answer: Absolutely B", "ABC") == (None, "no_answer")
    assert P("I think it is B", "ABC") == (None, "no_answer")
    assert P("The answer is A (yes). The question asks whether ...", "ABC") == ("A", None)  # SmolLM2's final turn
    assert P("答案为B。", "ABC") == ("B", None) and P("答案是 (C)", "ABC") == ("C", None)
    assert P("The answer is Absolutely clear", "ABC") == (None, "no_answer")
    assert P("The answer is A. Answer: B", "ABC") == (None, "conflicting")
    assert P("Answer: E", "ABC") == (None, "invalid_letter")
    assert P("Answer: A. Answer: B", "ABC") == (None, "conflicting")
    assert P(None, "ABC") == (None, "no_answer")


def _stub(final: dict[str, str]):
    """A generate_fn: plan -> 'because <letter> ...', verify -> fixed text, final -> per question."""
    calls = []

    def gen(prompts, max_new_tokens, tasks):
        calls.append(list(prompts))
        out = []
        for p in prompts:
            if "Think about why the answer is" in p:
                letter = p.split("Think about why the answer is ")[1][0]
                out.append(f"because {letter} fits")
            elif p.rstrip().endswith("Verification:"):
                out.append("reasoning B is consistent")
            else:
                q = next(q for q in final if q in p)
                out.append(final[q])
        return out

    gen.calls = calls
    return gen


def test_voc_records_trace_and_never_guesses():
    gen = _stub({"Which drug": "Answer: B", "common symptom": "maybe C or D",
                 "treat": "Answer: C"})  # q3 has only A/B
    res = voc.voc_answer(ITEMS, generate_fn=gen)
    assert len(gen.calls) == 3 and len(gen.calls[0]) == 3 + 4 + 2  # plan batched over all options
    r0, r1, r2 = res
    assert r0["explanations"] == {"A": "because A fits", "B": "because B fits", "C": "because C fits"}
    assert r0["verification"] == "reasoning B is consistent"
    assert (r0["answer"], r0["reason"], r0["final_text"]) == ("B", None, "Answer: B")
    assert (r1["answer"], r1["reason"], r1["parse_detail"]) == (None, "unparseable", "no_answer")
    assert r1["final_text"] == "maybe C or D"
    assert (r2["answer"], r2["reason"], r2["parse_detail"]) == (None, "unparseable", "invalid_letter")
    # the verify prompt shows every justification; the final prompt shows the verification
    assert "Reasoning for D: because D fits" in gen.calls[1][1]
    assert "Verification: reasoning B is consistent" in gen.calls[2][0]


def test_voc_label_pqa_u():
    items = [{"id": "u1", "question": "Does aspirin help fever ?", "context": "patient with fever",
              "long_answer": "aspirin does help", "options": {}, "answer": [], "task": "pubmedqa",
              "_loc": "pqa_u.json:[u1]"},
             {"id": "u2", "question": "Does blood test help ?", "context": None,
              "explanation": "rare", "options": {}, "answer": [], "task": "pubmedqa"}]
    gen = _stub({"aspirin help": "Answer: A", "blood test": "no idea"})
    out = voc.voc_label(items, generate_fn=gen)
    assert [r["id"] for r in out] == ["u1"]
    rec = out[0]
    assert rec["answer"] == ["A"] and rec["options"] == {"A": "yes", "B": "no", "C": "maybe"}
    assert rec["context"] == "patient with fever" and rec["explanation"] == "aspirin does help"
    assert rec["label_source"] == "voc" and rec["voc"]["final_text"] == "Answer: A"
    assert rec["_loc"] == "pqa_u.json:[u1]" and "long_answer" not in rec
    assert "Long answer: aspirin does help" in gen.calls[0][0]
    both = voc.voc_label(items, generate_fn=_stub({"aspirin help": "Answer: A", "blood test": "no"}),
                         keep_unlabeled=True)
    assert both[1]["answer"] == [] and both[1]["voc"]["reason"] == "unparseable"
    with pytest.raises(ValueError, match="long answer"):
        voc.voc_label([{"id": "x", "question": "q", "options": {}}], generate_fn=gen)


def test_voc_real_tiny_model_and_batched_generation():
    tok = tiny_tok()
    model = tiny_qwen(3)
    cue = [prompts.cue_prompt(it) for it in ITEMS]
    one = [voc.generate_texts(model, tok, [p], max_new_tokens=4)[0] for p in cue]
    many = voc.generate_texts(model, tok, cue, max_new_tokens=4, batch_size=3)
    assert one == many and all(t.strip() == t for t in many)
    # the greedy continuation of the first prompt, token by token with plain forwards
    ids = tok(cue[0])["input_ids"]
    with torch.no_grad():
        for _ in range(4):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            ids.append(nxt)
    assert one[0] == tok.decode(ids[len(tok(cue[0])["input_ids"]):], skip_special_tokens=True).strip()
    res = voc.voc_answer(ITEMS[:2], model, tok, max_new_tokens=3, final_max_new_tokens=3, batch_size=4)
    for item, r in zip(ITEMS, res):
        assert set(r["explanations"]) == set(item["options"])
        assert r["answer"] == voc.parse_final_answer(r["final_text"], list(item["options"]))[0]
        assert (r["answer"] is None) == (r["reason"] == "unparseable")
    labeled = voc.voc_label([{"id": "u", "question": "Does aspirin help ?", "context": None,
                              "long_answer": "yes", "options": {}, "answer": []}],
                            model, tok, max_new_tokens=2, final_max_new_tokens=2, keep_unlabeled=True)
    assert labeled[0]["voc"]["explanations"].keys() == {"A", "B", "C"}


def test_chat_template_and_task_ids_plumbing():
    from medpipe.stages.adapters.cpoly import inject_cpoly

    tok = tiny_tok()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant : {% endif %}")
    p = prompts.cue_prompt(ITEMS[0], tok=tok, chat=True)
    assert p.startswith("user : Question") and p.endswith("assistant : The answer is")
    cm = inject_cpoly(tiny_qwen(), ["t1", "t2"], target_modules="all-linear").eval()
    with torch.no_grad():
        for layer in cm.cpoly_layers().values():
            layer.cpoly_B.normal_(0, 0.5)
    items = [{**it, "task": t} for it, t in zip(ITEMS, ["t1", "t2", "t1"])]
    r_ppl = scoring.score_options_ppl(items, cm, tok)        # task ids passed automatically
    r_flat = scoring.score_options_ppl(items, cm, tok, share_prompt=False)
    for a, b in zip(r_ppl, r_flat):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)
    assert [r["pred"] for r in r_ppl] == [r["pred"] for r in r_flat]
    # the task ids change the scores: the same items scored as the other task differ
    other = scoring.score_options_ppl([{**it, "task": "t2" if it["task"] == "t1" else "t1"} for it in items], cm, tok)
    assert any(abs(a["scores"]["A"] - b["scores"]["A"]) > 1e-4 for a, b in zip(r_ppl, other))
    with pytest.raises(ValueError):                       # unknown task reaches the adapter
        scoring.score_options_ppl([{**ITEMS[0], "task": "t9"}], cm, tok)
