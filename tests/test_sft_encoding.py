"""SFT: loss only on assistant tokens of every turn, found from ONE rendering per conversation
(offsets), equal to the old prefix-by-prefix method where that one works, and working on the
published templates that do not render prefix by prefix; separate prompt/answer limits; the
over-length policy; tokenised data cached on disk under a fingerprint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from medpipe.data import DataError
from medpipe.stages.models.tiny import ensure_tiny
from medpipe.stages.training.chat_data import encode_dataset
from medpipe.stages.training.chat_masks import EncodeStats, Limits, SpanError, encode_chat

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"

CONVO = [
    {"role": "system", "content": "You are a careful physician."},
    {"role": "user", "content": "I have a fever and a cough."},
    {"role": "assistant", "content": "How long have you had them?"},
    {"role": "user", "content": "三天了。"},
    {"role": "assistant", "content": "建议查血常规并多饮水。"},
]
NOSYS = [
    {"role": "user", "content": "What is hypertension?"},
    {"role": "assistant", "content": "High blood pressure, usually above 130/80 mmHg."},
]
WITHSYS = [{"role": "system", "content": "You are a careful medical assistant."}, *NOSYS]
THREE = [
    {"role": "user", "content": "Is metformin first-line? Answer Yes. or No."},
    {"role": "assistant", "content": "Yes."},  # also inside the user text: must be found after it
    {"role": "user", "content": "起始剂量是多少？"},
    {"role": "assistant", "content": "通常每日500毫克，随餐服用。"},
    {"role": "user", "content": "Any side effects?"},
    {"role": "assistant", "content": "GI upset; take it with food."},
]


def tiny_tok():
    return AutoTokenizer.from_pretrained(ensure_tiny())


def by_prefixes(messages, tok, max_length):
    """The encoding medpipe used before (render growing prefixes, tokenise each piece): the
    reference the one-rendering method must equal where a template renders prefix by prefix."""
    spans, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        assert prompt.startswith(done) and full.startswith(prompt)
        spans += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    ids, mask = [], []
    for text, is_assistant in spans:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [int(is_assistant)] * len(piece)
    return {"input_ids": ids[:max_length], "assistant_masks": mask[:max_length]}


def trained_runs(tok, enc):
    runs, current = [], []
    for i, m in zip(enc["input_ids"], enc["assistant_masks"]):
        if m:
            current.append(i)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


def test_mask_covers_exactly_the_assistant_turns():
    tok = tiny_tok()
    enc = encode_chat(CONVO, tok, max_length=4096)
    assert tok.decode(enc["input_ids"]) == tok.apply_chat_template(CONVO, tokenize=False)  # same text as the template
    assert trained_runs(tok, enc) == ["How long have you had them?<|im_end|>\n", "建议查血常规并多饮水。<|im_end|>\n"]


@pytest.mark.parametrize("messages", [CONVO, CONVO[:3], CONVO[1:], NOSYS, WITHSYS, THREE], ids=range(6))
def test_one_rendering_equals_the_prefix_method(messages):
    tok = tiny_tok()
    for max_length in (4096, 17):
        assert encode_chat(messages, tok, max_length) == by_prefixes(messages, tok, max_length)


# ---- the published templates ------------------------------------------------------------------

EXTRA = {"chatml_qwen15": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
         "chatml_qwen2": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
         "qwen_7b_chat_chatml": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
         "smollm2": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"], "llama2_chat": [],
         "mistral_v03": ["[INST]", "[/INST]"], "gemma_it": ["<start_of_turn>", "<end_of_turn>"],
         "baichuan2_chat": ["<reserved_106>", "<reserved_107>"]}
METASPACE = {"llama2_chat", "mistral_v03", "gemma_it", "baichuan2_chat"}  # SentencePiece-style "▁"


def published(name: str):
    """A small BPE tokenizer with the model's special tokens and its published chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sp = json.loads((TEMPLATES / "specials.json").read_text())[name]
    named = {k: sp[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if sp.get(k)}
    specials = list(dict.fromkeys([*named.values(), *EXTRA[name]]))
    corpus = [m["content"] for c in (CONVO, WITHSYS, THREE) for m in c] * 3 + ["system user assistant model\n"] * 3
    if name in METASPACE:
        tk = Tokenizer(models.BPE(unk_token=sp.get("unk_token") or "<unk>"))
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(dict.fromkeys(specials + ["<unk>"])),
                                      initial_alphabet=["\n"])
    else:
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus, trainer)
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, additional_special_tokens=EXTRA[name], **named)
    tok.chat_template = (TEMPLATES / f"{name}.jinja").read_text()
    return tok


ANSWERS = {"NOSYS": ["High blood pressure, usually above 130/80 mmHg."],
           "THREE": ["Yes.", "通常每日500毫克，随餐服用。", "GI upset; take it with food."]}
# what a template prints after an answer (trained with it): (after every answer, after the last)
ENDS = {"chatml_qwen15": ("<|im_end|>", ""), "chatml_qwen2": ("<|im_end|>\n",) * 2,
        "smollm2": ("<|im_end|>\n",) * 2, "qwen_7b_chat_chatml": ("<|im_end|>",) * 2,
        "llama2_chat": (" </s>",) * 2, "mistral_v03": ("</s>",) * 2,
        "gemma_it": ("<end_of_turn>\n",) * 2, "baichuan2_chat": ("", "</s>")}


@pytest.mark.parametrize("name", sorted(ENDS))
@pytest.mark.parametrize("conv", ["NOSYS", "WITHSYS", "THREE", "THREE+SYS"])
def test_published_templates_train_exactly_each_answer_and_its_end_of_turn(name, conv):
    tok = published(name)
    messages = {"NOSYS": NOSYS, "WITHSYS": WITHSYS, "THREE": THREE, "THREE+SYS": [WITHSYS[0], *THREE]}[conv]
    answers = ANSWERS["NOSYS" if "SYS" in conv and "THREE" not in conv or conv == "NOSYS" else "THREE"]
    mid, last = ENDS[name]
    want = [a + mid for a in answers[:-1]] + [answers[-1] + last]
    got = [t.replace("▁", " ") for t in trained_runs(tok, encode_chat(messages, tok, 4096))]
    norm = lambda s: s.replace("<unk>", "\n").strip(" ")  # noqa: E731 - toy vocab: "\n" may be <unk>
    assert [norm(g) for g in got] == [norm(w) for w in want]
    if "SYS" in conv and conv != "NOSYS":  # the system prompt is in the text trained on, never dropped
        text = tok.decode(encode_chat(messages, tok, 4096)["input_ids"]).replace("▁", " ")
        assert "You are a careful medical assistant." in text


def test_mistral_v03_with_a_system_turn_is_folded_and_counted(tmp_path):
    tok = published("mistral_v03")
    stats = EncodeStats()
    ds = encode_dataset([{"messages": WITHSYS, "_loc": "a.jsonl:1"}, {"messages": NOSYS, "_loc": "a.jsonl:2"}],
                        tok, 4096, tmp_path, stats=stats)
    assert len(ds) == 2 and stats.system_folded == 1 and stats.kept == 2


def test_an_answer_the_template_rewrites_names_the_record(tmp_path):
    tok = tiny_tok()
    tok.chat_template = tok.chat_template.replace("{{ message['content'] }}", "{{ message['content'] | upper }}")
    recs = [{"messages": NOSYS, "_loc": "data/chat.jsonl:1"}, {"messages": THREE, "_loc": "data/chat.jsonl:7"}]
    recs[0]["messages"] = [dict(m, content=m["content"].upper()) for m in NOSYS]  # unchanged by upper
    with pytest.raises(DataError) as e:
        encode_dataset(recs, tok, 4096, tmp_path)
    assert str(e.value).startswith("data/chat.jsonl:7: field 'messages': messages[0] (user): its content is not in the "
                                   "rendering")
    stats = EncodeStats()
    ds = encode_dataset(recs, tok, 4096, tmp_path, on_error="skip", stats=stats)
    assert len(ds) == 1 and stats.failed == 1 and stats.errors[0].startswith("data/chat.jsonl:7: messages[0]")
    with pytest.raises(SpanError):
        encode_chat(THREE, tok, 4096)


def test_prompt_and_answer_are_cut_separately():
    tok = tiny_tok()
    long_q = [{"role": "user", "content": "fever " * 200}, {"role": "assistant", "content": "rest " * 200}]
    full = encode_chat(long_q, tok, 4096)
    cut = encode_chat(long_q, tok, 4096, limits=Limits(4096, max_prompt_length=32, max_response_length=24))
    ids, mask = cut["input_ids"], cut["assistant_masks"]
    assert mask.count(0) == 32 and mask.count(1) == 24 and mask == [0] * 32 + [1] * 24
    header = tok("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert ids[32 - len(header):32] == header  # the template's markers stay; the user text's end went
    assert ids[:10] == full["input_ids"][:10]  # the prompt keeps its start
    first_answer = [t for t, m in zip(full["input_ids"], full["assistant_masks"]) if m][:24]
    assert ids[32:] == first_answer  # the answer keeps its start


def test_overlength_policies(tmp_path):
    tok = tiny_tok()
    recs = [{"messages": CONVO, "_loc": "c.jsonl:1"}, {"messages": NOSYS, "_loc": "c.jsonl:2"}]
    n = len(encode_chat(CONVO, tok, 4096)["input_ids"])
    m = len(encode_chat(NOSYS, tok, 4096)["input_ids"])
    assert n > m
    stats = EncodeStats()
    ds = encode_dataset(recs, tok, m, tmp_path, limits=Limits(m, overlength="drop"), stats=stats)
    assert len(ds) == 1 and stats.overlength_dropped == 1
    stats = EncodeStats()
    ds = encode_dataset(recs, tok, m, tmp_path, limits=Limits(m, overlength="truncate"), stats=stats)
    assert len(ds) == 2 and stats.truncated == 1 and len(ds[0]["input_ids"]) == m
    with pytest.raises(DataError, match=r"^c\.jsonl:1: field 'messages': longer than max_length="):
        encode_dataset(recs, tok, m, tmp_path, limits=Limits(m, overlength="error"))


def test_truncation_keeps_the_start_and_drops_conversations_without_assistant_tokens(tmp_path):
    tok = tiny_tok()
    short = encode_chat(CONVO, tok, max_length=10)
    assert len(short["input_ids"]) == 10 and not any(short["assistant_masks"])
    ds = encode_dataset([{"messages": CONVO}, {"messages": CONVO[:3]}], tok, 10, tmp_path)
    assert len(ds) == 0
    ds = encode_dataset([{"messages": CONVO}, {"messages": CONVO[:3]}], tok, 4096, tmp_path)
    assert len(ds) == 2
    cached = list(tmp_path.glob("sft-*"))
    assert len(cached) == 1  # one per (data, max_length); the empty result is not cached
    stats = EncodeStats()
    again = encode_dataset([{"messages": CONVO}, {"messages": CONVO[:3]}], tok, 4096, tmp_path, stats=stats)
    assert again.cache_files and again["input_ids"] == ds["input_ids"]  # read back from disk
    assert stats.prepared_by == "cache" and stats.kept == 2


def test_parallel_encoding_gives_the_same_rows_and_the_fingerprint_names_the_cache(tmp_path):
    tok = tiny_tok()
    recs = [{"messages": [*CONVO[:3], {"role": "user", "content": f"第{i}天"},
                          {"role": "assistant", "content": f"answer {i}"}], "_loc": f"x.jsonl:{i}"} for i in range(600)]
    one = encode_dataset(recs, tok, 4096, tmp_path / "a", num_proc=1)
    two = encode_dataset(recs, tok, 4096, tmp_path / "b", num_proc=2)
    assert one["input_ids"] == two["input_ids"] and one["assistant_masks"] == two["assistant_masks"]
    fp = encode_dataset(recs, tok, 4096, tmp_path / "c", fingerprint="data-sha-1")
    assert fp["input_ids"] == one["input_ids"]
    stats = EncodeStats()
    encode_dataset([], tok, 4096, tmp_path / "c", fingerprint="data-sha-1", stats=stats)  # same key: the cache
    assert stats.prepared_by == "cache" and stats.kept == 600


def test_our_labels_train_what_trls_own_preparation_trains(tmp_path):
    """Unpacked SFT skips TRL's dataset preparation (chat_data.with_labels): the labels are -100
    off the assistant mask, and the trainer's loss equals TRL's prepared path on the same rows."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from medpipe.stages.training.chat_data import with_labels

    tok = tiny_tok()
    recs = [{"messages": m} for m in (CONVO, NOSYS, WITHSYS, THREE) * 3]
    ds = encode_dataset(recs, tok, 48, tmp_path)  # 48 tokens: some conversations are cut
    ours = with_labels(ds)
    assert ours.column_names == ["input_ids", "labels"] and ours["input_ids"] == ds["input_ids"]
    for ids, mask, labels in zip(ds["input_ids"], ds["assistant_masks"], ours["labels"]):
        assert labels == [i if m else -100 for i, m in zip(ids, mask)]
    losses = {}
    for skip in (True, False):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(ensure_tiny())
        args = SFTConfig(output_dir=str(tmp_path / f"o{skip}"), use_cpu=True, bf16=False, report_to=[],
                         per_device_eval_batch_size=4, max_length=48,
                         dataset_kwargs={"skip_prepare_dataset": True} if skip else None)
        data = ours if skip else ds
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, eval_dataset=data, processing_class=tok)
        losses[skip] = trainer.evaluate()["eval_loss"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)


# ---- padding-free packing ---------------------------------------------------------------------

def _losses_per_conversation(logits, labels, starts):
    """Mean next-token loss of each conversation (labels already -100 outside answers)."""
    import torch

    logp = torch.log_softmax(logits.float(), -1)
    out = []
    bounds = list(starts) + [labels.shape[-1]]
    for a, b in zip(bounds[:-1], bounds[1:]):
        tgt = labels[0, a + 1:b]
        pred = logp[0, a:b - 1]
        keep = tgt != -100
        out.append(float(-pred[keep].gather(-1, tgt[keep][:, None]).mean()))
    return out


def test_packed_batch_gives_each_conversation_the_loss_it_has_alone():
    """A padding-free packed batch (TRL's collator: one row, position ids restart per conversation,
    no attention mask) gives every conversation the same loss and logits as the conversation
    alone: no attention across conversations, masks kept."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from medpipe.stages.models.loader import load_causal_lm

    tok = tiny_tok()
    model = load_causal_lm(ensure_tiny(), dtype=torch.float32, attn_implementation="sdpa").eval()
    convs = [CONVO, NOSYS, THREE, WITHSYS]
    rows = []
    for c in convs:
        e = encode_chat(c, tok, 4096)
        rows.append({"input_ids": e["input_ids"],
                     "labels": [t if m else -100 for t, m in zip(e["input_ids"], e["assistant_masks"])]})
    alone = []
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r["input_ids"]])
            logits = model(input_ids=ids).logits
            alone.append((logits, _losses_per_conversation(logits, torch.tensor([r["labels"]]), [0])[0]))
        batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id or 0, padding_free=True)(rows)
        assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    starts = [0]
    for r in rows[:-1]:
        starts.append(starts[-1] + len(r["input_ids"]))
    got = _losses_per_conversation(packed, batch["labels"], starts)
    want = [loss for _, loss in alone]
    assert got == pytest.approx(want, abs=1e-5)
    for (logits, _), a in zip(alone, starts):
        assert torch.allclose(packed[0, a:a + logits.shape[1]], logits[0], atol=1e-4)
    # every computed token is a real one (no padding), against the padded batch of the same rows
    lengths = [len(r["input_ids"]) for r in rows]
    assert batch["input_ids"].numel() == sum(lengths)
    assert sum(lengths) / (len(lengths) * max(lengths)) < 0.8  # what padding wasted on this mix


def test_the_trained_mask_is_class_2_exactly():
    from medpipe.stages.training.chat_masks import _cut_runs

    ids, mask, p_cut, r_cut = _cut_runs([5, 6, 7, 8, 9], [0, 1, 2, 2, 0], Limits(100))
    assert (ids, mask, p_cut, r_cut) == ([5, 6, 7, 8, 9], [0, 0, 1, 1, 0], False, False)
