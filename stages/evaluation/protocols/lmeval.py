"""protocol `lm-eval`: EleutherAI lm-evaluation-harness 0.4.13, `output_type: multiple_choice`.

Followed files (lm_eval/ in the 0.4.13 wheel = EleutherAI/lm-evaluation-harness @4e7e0d47):
* prompts: tasks/medqa/preprocess_medqa.py (medqa_4options), tasks/medmcqa/utils_medmcqa.py
  (medmcqa), tasks/pubmedqa/preprocess_pubmedqa.py (pubmedqa), tasks/ceval/_default_ceval_yaml +
  _generate_configs.py (ceval-valid_<subject>: description + "答案："), tasks/cmmlu/
  _default_template_yaml + _generate_configs.py (cmmlu_<subject>: C-Eval's item text, its own
  description). A C-Eval-shaped set is CMMLU when its `task:` is `cmmlu_<subject>` (CMMLU's
  Question/Answer columns renamed with `columns:`); the subject comes from the task name
  (`cmmlu_<subject>`, `ceval-valid_<subject>`) or C-Eval's file name (`<subject>_val.csv`);
  tasks/mmlu/default/_default_template_yaml + mmlu_<subject>.yaml (mmlu_<subject>: "The following are
  multiple choice questions (with answers) about <subject, "_" → " ">.\n\n" + question.strip() +
  "\nA. ..\nD. ..\nAnswer:", few-shot = the first k of the subject's dev split), on MMLU's
  published CSV (format mmlu; subject from the task name or the file name `<subject>_test.csv`);
* assembly: api/task.py `fewshot_context` — description + Σ shots (doc_to_text + " " + gold choice +
  "\n\n") + doc_to_text(doc); the continuation is " " + choice (`target_delimiter`); with a chat
  template (`--apply_chat_template`, few-shot as multi-turn) the description is the system turn,
  each shot a user/assistant pair, and the continuation has no leading space;
* few-shot sampler: api/samplers.py — medqa/medmcqa/pubmedqa draw `random.Random(1234).sample(pool,
  k)` for doc after doc (one generator per task, seed = the CLI's default fewshot seed 1234),
  C-Eval takes the first k of its dev split (`first_n`);
* tokenisation: api/model.py `_encode_pair` — trailing whitespace of the context moves to the
  continuation; the continuation's tokens are encode(context + continuation)[len(encode(context)):]
  (tokenizer defaults, so BOS where the tokenizer adds one; none when the text starts with it);
* scores: models/huggingface.py `_loglikelihood_tokens` (sum of the continuation tokens'
  log-probabilities) and api/task.py `process_results`: `acc` = argmax log-likelihood, `acc_norm` =
  argmax log-likelihood / len(choice) (characters of the bare choice, without the space); ties go
  to the first choice (np.argmax).
Per item the details keep every choice's log-likelihood (`scores`), token count and characters.
"""
from __future__ import annotations

import random
from typing import Any, Sequence

FEWSHOT_SEED = 1234
CEVAL_SUBJECTS_ZH = {"clinical_medicine": "临床医学", "basic_medicine": "基础医学", "physician": "医师资格",
                     "veterinary_medicine": "兽医学"}
CMMLU_SUBJECTS_ZH = {"anatomy": "解剖学", "clinical_knowledge": "临床知识", "college_medical_statistics": "大学医学统计",
                     "college_medicine": "大学医学", "genetics": "遗传学", "human_sexuality": "人类性行为",
                     "nutrition": "营养学", "professional_medicine": "专业医学",
                     "traditional_chinese_medicine": "中医中药", "virology": "病毒学"}
RANDOM_SHOTS = ("medqa", "medmcqa", "pubmedqa")  # the others (C-Eval, CMMLU) take the first k dev items


def exam_subject(item: dict) -> tuple[str, str]:
    """("ceval" | "cmmlu" | "mmlu", subject) of a C-Eval- or MMLU-shaped item."""
    task = str(item.get("task") or "")
    if task.startswith("mmlu_"):
        return "mmlu", task[len("mmlu_"):]
    if task == "mmlu":  # format mmlu's default task: the subject is the file's
        return "mmlu", str(item.get("subject") or "")
    if task.startswith("cmmlu_"):
        return "cmmlu", task[len("cmmlu_"):]
    for prefix in ("ceval-valid_", "ceval_"):  # lm-eval's task name, conf/data/public.yaml's
        if task.startswith(prefix):
            return "ceval", task[len(prefix):]
    return "ceval", str(item.get("subject") or "")


def _letters_block(item: dict) -> str:
    return "".join(f"{k}. {v}\n" for k, v in item["options"].items())


def doc_to_text(item: dict, fmt: str) -> str:
    """The harness's prompt of one item (the set's format picks the task)."""
    q = str(item.get("question") or "")
    if fmt == "medqa":      # tasks/medqa/preprocess_medqa.py
        return f"Question: {q}\n{_letters_block(item)}Answer:"
    if fmt == "medmcqa":    # tasks/medmcqa/utils_medmcqa.py
        return "Question: " + q + "\nChoices:\n" + _letters_block(item) + "Answer:"
    if fmt == "pubmedqa":   # tasks/pubmedqa/preprocess_pubmedqa.py ("\n".join(CONTEXTS))
        return "Abstract: {}\nQuestion: {}\nAnswer:".format(item.get("context") or "", q)
    if fmt == "ceval":      # tasks/ceval/_default_ceval_yaml
        return f"{q.strip()}\n" + "".join(f"{k}. {v}\n" for k, v in item["options"].items()) + "答案："
    if fmt == "mmlu":       # tasks/mmlu/default/_default_template_yaml (choices as they are, unstripped)
        return f"{q.strip()}\n" + "".join(f"{k}. {v}\n" for k, v in item["options"].items()) + "Answer:"
    raise ValueError(f"protocol lm-eval has no task for format '{fmt}' (medqa, medmcqa, pubmedqa, ceval, mmlu)")


def choices(item: dict, fmt: str) -> list[tuple[str, str]]:
    """[(option letter, choice text)]: the letters for letter tasks, yes/no/maybe for PubMedQA."""
    if fmt == "pubmedqa":
        return [(k, v) for k, v in item["options"].items()]
    return [(k, k) for k in item["options"]]


def description(item: dict, fmt: str) -> str:
    if fmt == "mmlu":  # tasks/mmlu/_generate_configs.py: every subject's own yaml says the same
        subject = exam_subject(item)[1]
        if not subject:
            raise ValueError("protocol lm-eval, MMLU: no subject (name it in the task: mmlu_<subject>, or the file "
                             "<subject>_test.csv)")
        return f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}.\n\n"
    if fmt != "ceval":
        return ""
    exam, subject = exam_subject(item)
    names = CMMLU_SUBJECTS_ZH if exam == "cmmlu" else CEVAL_SUBJECTS_ZH
    if subject not in names:
        raise ValueError(f"protocol lm-eval, {'CMMLU' if exam == 'cmmlu' else 'C-Eval'}: unknown medical subject "
                         f"{subject!r} (name it in the task: cmmlu_<subject> / ceval-valid_<subject>, or a C-Eval file "
                         f"<subject>_val.csv; one of {', '.join(names)})")
    if exam == "cmmlu":  # tasks/cmmlu/_generate_configs.py
        return f"以下是关于{names[subject]}的单项选择题，请直接给出正确答案的选项。\n\n"
    return f"以下是中国关于{names[subject]}的单项选择题，请选出其中的正确答案。\n\n"


def pick_shots(items: Sequence[dict], pool: list[dict], k: int, fmt: str) -> list[list[dict]]:
    """lm-eval's few-shot draw for every item, in order."""
    pool = [e for e in pool if e.get("answer")]
    if k <= 0 or not pool:
        return [[] for _ in items]
    if fmt in RANDOM_SHOTS:
        rnd = random.Random(FEWSHOT_SEED)
        return [rnd.sample(pool, k) for _ in items]
    return [same_subject(it, pool)[:k] for it in items]


def same_subject(item: dict, pool: list[dict]) -> list[dict]:
    """The dev items of the item's own subject (each C-Eval / CMMLU subject task has its own dev
    split), in file order; the whole pool when none carries that subject."""
    own = [e for e in pool if exam_subject(e) == exam_subject(item)]
    return own or pool


def context_text(item: dict, fmt: str, shots: list[dict], tok: Any = None, chat: bool = False,
                 extra: str = "") -> str:
    """The context string lm-eval scores the choices after (`extra`: RAG passages before the item)."""
    desc = description(item, fmt)

    def gold(e: dict) -> str:
        return dict(choices(e, fmt))[e["answer"][0]]

    doc = (extra + "\n" if extra else "") + doc_to_text(item, fmt)
    if chat:
        msgs = [{"role": "system", "content": desc}] if desc else []
        for e in shots:
            msgs += [{"role": "user", "content": doc_to_text(e, fmt)}, {"role": "assistant", "content": gold(e)}]
        msgs.append({"role": "user", "content": doc})
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return desc + "".join(doc_to_text(e, fmt) + " " + gold(e) + "\n\n" for e in shots) + doc


def encode_pair(tok: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """api/model.py `_encode_pair` for causal models, with HFLM.tok_encode's special-token rule."""
    return encode_pairs(tok, [(context, continuation)])[0]


def encode_pairs(tok: Any, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """encode_pair for many pairs: each distinct context tokenised once, in batch calls (the fast
    tokenizer encodes a list in parallel) — the same ids as one at a time. The continuation's ids
    are encode(context + continuation)[len(encode(context)):]; with a byte-level BPE tokenizer
    (GPT-2, Llama 3, Qwen2, SmolLM2: merges never cross a pre-token) only the context's last two
    pre-tokens + the continuation are re-encoded (`_tail_split`), not the whole text once per
    choice — checked per pair, else the whole text is encoded."""
    moved = []
    for context, continuation in pairs:
        n = len(context) - len(context.rstrip())
        moved.append((context[:-n], context[-n:] + continuation) if n else (context, continuation))
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    bos_text = tok.decode([prefix]) if prefix is not None else None

    def encode(texts: list[str]) -> dict[str, list[int]]:
        bare = sorted({t for t in texts if bos_text and t.startswith(bos_text)})  # already has its BOS text
        plain = sorted(set(texts) - set(bare))
        out = dict(zip(plain, tok(plain)["input_ids"])) if plain else {}
        if bare:
            out.update(zip(bare, tok(bare, add_special_tokens=False)["input_ids"]))
        return out

    ctx_ids = encode([c for c, _ in moved])
    split = _tail_split(tok, sorted(ctx_ids), bos_text)
    tails = {c: c[split[c]:] for c in split}
    raw = sorted({tails[c] for c in tails} | {tails[c] + k for c, k in moved if c in tails})
    raw_ids = dict(zip(raw, tok(raw, add_special_tokens=False)["input_ids"])) if raw else {}
    fast = {c for c in tails if ctx_ids[c][-len(raw_ids[tails[c]]):] == raw_ids[tails[c]] and raw_ids[tails[c]]}
    whole_ids = encode([c + k for c, k in moved if c not in fast])
    out = []
    for c, k in moved:
        if c in fast and _same_normalized(tok, c + k):
            out.append((list(ctx_ids[c]), list(raw_ids[tails[c] + k])[len(raw_ids[tails[c]]):]))
        else:
            whole = whole_ids.get(c + k) or encode([c + k])[c + k]
            out.append((list(ctx_ids[c]), list(whole)[len(ctx_ids[c]):]))
    return out


def _tail_split(tok: Any, contexts: list[str], bos_text: str | None) -> dict[str, int]:
    """{context: where its last two pre-tokens start} for a fast byte-level BPE tokenizer whose
    special tokens are only a prefix and whose normaliser leaves the context unchanged; {} else."""
    backend = getattr(tok, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    if pre is None or "ByteLevel" not in repr(pre) or "Metaspace" in repr(pre):
        return {}
    probe = "ab c"
    with_sp, bare = tok(probe)["input_ids"], tok(probe, add_special_tokens=False)["input_ids"]
    if with_sp[len(with_sp) - len(bare):] != bare:  # a post-processor that appends (EOS) or reorders
        return {}
    out = {}
    for c in contexts:
        if (bos_text and c.startswith(bos_text)) or not _same_normalized(tok, c):
            continue
        pieces = pre.pre_tokenize_str(c)
        if len(pieces) >= 3:  # the first pre-token stays out of the tail (it may carry the BOS)
            out[c] = pieces[-2][1][0]
    return out


def _same_normalized(tok: Any, text: str) -> bool:
    norm = getattr(tok.backend_tokenizer, "normalizer", None)
    return norm is None or norm.normalize_str(text) == text


def run(items: list[dict], fmt: str, p: Any, backend: Any, pool: list[dict], rag_ctx: list[str]) -> list[dict]:
    from ..prompts import prompt_hash
    from ..scoring import score_continuations

    if backend.model is None:
        from medpipe.errors import ConfigError

        raise ConfigError("protocol=lm-eval scores log-likelihoods: it needs backend=transformers")
    tok = backend.tok
    shots = pick_shots(items, pool, p.shots, fmt)
    delim = "" if p.chat else " "
    contexts = [context_text(it, fmt, ex, tok, p.chat, rc) for it, ex, rc in zip(items, shots, rag_ctx)]
    chs = [choices(it, fmt) for it in items]
    flat = encode_pairs(tok, [(ctx, delim + text) for ctx, c in zip(contexts, chs) for _, text in c])
    prepared, j = [], 0
    for c in chs:
        pairs = flat[j:j + len(c)]
        j += len(c)
        prepared.append((pairs[0][0], {k: cont for (k, _), (_, cont) in zip(c, pairs)}))
    scored = score_continuations(prepared, backend.model, tok, batch_size=p.batch_size, reduction="sum",
                                 max_length=p.max_length)
    out = []
    for it, ctx, c, r in zip(items, contexts, chs, scored):
        ll = {k: -r["scores"][k] for k, _ in c}
        chars = {k: len(text) for k, text in c}
        pred = max(ll, key=ll.get)  # dicts keep option order: ties → the first, as np.argmax
        norm = {k: ll[k] / chars[k] for k in ll}
        out.append({"id": it.get("id"), "gold": it["answer"], "pred": [pred], "pred_norm": [max(norm, key=norm.get)],
                    "scores": ll, "n_tokens": r["n_tokens"], "chars": chars, "prompt_sha": prompt_hash(ctx)})
    return out
