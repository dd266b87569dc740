"""Format adapters: one function per public dataset shape, registered in ``FORMATS``.

Each adapter turns one raw record (a dict from :mod:`readers`, after the source's ``columns``
renames) into a record of one *kind*:

=========== ============================================================================
kind        shape
=========== ============================================================================
text        {"text"}
qa          {"question", "answer"}                       (Huatuo-26M; rendered by render.py)
chat        {"messages", "task"}
preference  {"prompt": [messages ending with user], "chosen", "rejected"}
feedback    {"prompt": [messages ending with user], "completion", "label": bool}   (unpaired, KTO)
mcq         {"id", "question", "context", "options", "answer", "explanation", "subject", "task"}
=========== ============================================================================

Problems raise :class:`DataError` naming path:line and the field *as named in the file*.

In order: the field helpers the adapters share, one adapter per published shape (`fmt_<name>`),
and the registry (`Format`: its kind, the keys that detect it, what else the shared code asks of a
format — the MedMCQA `cop` numbering, the answer field, the eval set kind it makes).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class Ctx:
    path: str
    line: object = None
    rev: dict = field(default_factory=dict)          # format field -> file field (columns)
    file_keys: set | None = None                    # CSV header / parquet schema
    task: str | None = None                         # source's task
    cop_base: int | None = None
    container: str = "json"

    def __post_init__(self):
        self.stem = Path(self.path).stem

    def name(self, f: str) -> str:
        if not self.rev:
            return f
        head, sep, tail = f.partition(".")
        head0 = head.split("[", 1)[0]
        orig = self.rev.get(head0)
        return f if orig is None else orig + head[len(head0):] + sep + tail

    def err(self, problem: str, f: str | None, reason: str) -> DataError:
        return DataError(problem, self.path, self.line, None if f is None else self.name(f),
                         reason=reason)


# ---- field helpers -------------------------------------------------------------------------

def _tname(v) -> str:
    return type(v).__name__


def req_str(r: dict, key: str, ctx: Ctx, label: str | None = None) -> str:
    v = r.get(key)
    if v is None:
        raise ctx.err("missing" if key not in r else "is null", label or key, "missing_field")
    if not isinstance(v, str):
        if isinstance(v, (int, float)) and not isinstance(v, bool) and ctx.container == "csv":
            v = str(v)
        else:
            raise ctx.err(f"wrong type: expected a string, got {_tname(v)}", label or key,
                          "wrong_type")
    if not v.strip():
        raise ctx.err("empty", label or key, "empty_field")
    return v


def opt_str(r: dict, key: str, ctx: Ctx, label: str | None = None) -> str | None:
    v = r.get(key)
    if v is None:
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str):
        raise ctx.err(f"wrong type: expected a string, got {_tname(v)}", label or key,
                      "wrong_type")
    v = v.strip()
    return v or None


def req_list(r: dict, key: str, ctx: Ctx, label: str | None = None) -> list:
    v = r.get(key)
    if v is None:
        raise ctx.err("missing" if key not in r else "is null", label or key, "missing_field")
    if hasattr(v, "tolist") and not isinstance(v, (str, bytes)):
        v = v.tolist()
    if not isinstance(v, (list, tuple)):
        raise ctx.err(f"wrong type: expected a list, got {_tname(v)}", label or key, "wrong_type")
    if not v:
        raise ctx.err("empty list", label or key, "empty_field")
    return list(v)


# ---- text ----------------------------------------------------------------------------------

def fmt_text(r, ctx):
    return {"text": req_str(r, "text", ctx)}


# ---- Huatuo-26M QA -------------------------------------------------------------------------
# Huatuo-26M-Lite (format_data.jsonl): {"id", "question", "answer", "score", "label",
#   "related_diseases"}; the full releases (huatuo_encyclopedia_qa / _knowledge_graph_qa /
#   _consultation_qa): {"questions": [...] or [[...]], "answers": [...]}. Both are read; with
#   several questions the first is used (the others are paraphrases), answers are joined.

def _first_str(v, ctx, key):
    while isinstance(v, (list, tuple)) and v:
        v = v[0]
    if not isinstance(v, str):
        raise ctx.err(f"wrong type: expected text, got {_tname(v)}", key, "wrong_type")
    if not v.strip():
        raise ctx.err("empty", key, "empty_field")
    return v


def fmt_huatuo(r, ctx):
    if "questions" in r or "answers" in r:
        qs = req_list(r, "questions", ctx)
        ans = req_list(r, "answers", ctx)
        q = _first_str(qs, ctx, "questions[0]")
        flat = []
        for i, a in enumerate(ans):
            flat.append(_first_str(a, ctx, f"answers[{i}]"))
        a = "\n".join(flat)
    else:
        # the Huatuo-26M test files hold lists in the singular keys too ({"question": ["..."]})
        q = _first_str(r["question"], ctx, "question") if isinstance(r.get("question"), list) \
            else req_str(r, "question", ctx)
        if isinstance(r.get("answer"), list):
            a = "\n".join(_first_str(x, ctx, f"answer[{i}]") for i, x in enumerate(r["answer"])) \
                if r["answer"] else _first_str(r["answer"], ctx, "answer")
        else:
            a = req_str(r, "answer", ctx)
    out = {"question": q.strip(), "answer": a.strip()}
    lab = r.get("label")
    if isinstance(lab, str) and lab.strip():
        out["subject"] = lab.strip()
    return out


# ---- chat ----------------------------------------------------------------------------------

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
                   "model": "assistant", "system": "system"}
_MSG_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}


def _check_dialogue(msgs, ctx, key, need_final_assistant=True):
    roles = [m["role"] for m in msgs]
    if "user" not in roles:
        raise ctx.err("no user turn", key, "bad_dialogue")
    if need_final_assistant and roles[-1] != "assistant":
        raise ctx.err(f"last turn is '{roles[-1]}', expected an assistant turn", key,
                      "bad_dialogue")
    if "system" in roles[1:]:
        raise ctx.err("a system turn may only come first", key, "bad_dialogue")
    return msgs


def _content(v, ctx, f):
    if isinstance(v, list):  # OpenAI content parts
        parts = []
        for j, p in enumerate(v):
            if isinstance(p, dict) and p.get("type", "text") == "text" and isinstance(
                    p.get("text"), str):
                parts.append(p["text"])
            else:
                raise ctx.err("only text content parts are supported", f"{f}[{j}]",
                              "wrong_type")
        v = "".join(parts)
    if v is None:
        raise ctx.err("missing", f, "missing_field")
    if not isinstance(v, str):
        raise ctx.err(f"wrong type: expected a string, got {_tname(v)}", f, "wrong_type")
    if not v.strip():
        raise ctx.err("empty", f, "empty_field")
    return v


def convert_turns(turns, ctx, key, role_key, content_key, roles_map) -> list[dict]:
    msgs = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise ctx.err(f"wrong type: expected an object, got {_tname(t)}", f"{key}[{i}]",
                          "wrong_type")
        if role_key not in t:
            raise ctx.err("missing", f"{key}[{i}].{role_key}", "missing_field")
        role = roles_map.get(str(t[role_key]).lower())
        if role is None:
            raise ctx.err(f"unknown role {t[role_key]!r}; known: {sorted(roles_map)}",
                          f"{key}[{i}].{role_key}", "bad_role")
        if content_key not in t:
            raise ctx.err("missing", f"{key}[{i}].{content_key}", "missing_field")
        msgs.append({"role": role,
                     "content": _content(t[content_key], ctx, f"{key}[{i}].{content_key}")})
    return msgs


def _system(r, ctx, msgs):
    s = opt_str(r, "system", ctx)
    if s and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": s})
    return msgs


def fmt_alpaca(r, ctx):
    ins = req_str(r, "instruction", ctx)
    inp = opt_str(r, "input", ctx)
    out = req_str(r, "output", ctx)
    msgs = []
    hist = r.get("history")
    if hist:
        if not isinstance(hist, list):
            raise ctx.err(f"wrong type: expected a list of [query, response], got {_tname(hist)}",
                          "history", "wrong_type")
        for i, pair in enumerate(hist):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise ctx.err("expected [query, response]", f"history[{i}]", "wrong_type")
            msgs.append({"role": "user", "content": _content(pair[0], ctx, f"history[{i}][0]")})
            msgs.append({"role": "assistant",
                         "content": _content(pair[1], ctx, f"history[{i}][1]")})
    user = ins.strip() + ("\n\n" + inp if inp else "")
    msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": out}]
    return {"messages": _system(r, ctx, msgs), "task": ctx.task}


def fmt_sharegpt(r, ctx):
    turns = req_list(r, "conversations", ctx)
    msgs = convert_turns(turns, ctx, "conversations", "from", "value", _SHAREGPT_ROLES)
    return {"messages": _check_dialogue(_system(r, ctx, msgs), ctx, "conversations"),
            "task": ctx.task}


def fmt_messages(r, ctx):
    turns = req_list(r, "messages", ctx)
    msgs = convert_turns(turns, ctx, "messages", "role", "content", _MSG_ROLES)
    return {"messages": _check_dialogue(msgs, ctx, "messages"), "task": ctx.task}


def fmt_promptcblue(r, ctx):
    # PromptCBLUE: {"input", "target", "answer_choices", "task_type", "task_dataset", "sample_id"}
    inp = req_str(r, "input", ctx)
    if r.get("target") is None or (isinstance(r.get("target"), str) and not r["target"].strip()):
        raise ctx.err("no target: an unlabeled split (PromptCBLUE's test.json has no answers); "
                      "use the labeled dev/train files", "target", "unlabeled")
    tgt = req_str(r, "target", ctx)
    task = ctx.task or opt_str(r, "task_dataset", ctx) or opt_str(r, "task_type", ctx) \
        or "promptcblue"
    return {"messages": [{"role": "user", "content": inp}, {"role": "assistant", "content": tgt}],
            "task": task}


_CHATMED_Q = re.compile(r"^\s*(?:<s>)?\s*(?:问[：:])?\s*")
_CHATMED_Q_END = re.compile(r"\s*(?:答[：:])?\s*$")
_CHATMED_A = re.compile(r"^\s*(?:答[：:])?\s*")
_CHATMED_A_END = re.compile(r"\s*(?:</s>)?\s*$")


def fmt_chatmed(r, ctx):
    # ChatMed_Consult_Dataset / ChatMed_TCM: {"query", "response"}; some copies wrap the query as
    # "<s>问：...答：" (the prompt it was trained with) and end the response with "</s>": stripped
    q = _CHATMED_Q_END.sub("", _CHATMED_Q.sub("", req_str(r, "query", ctx), count=1), count=1)
    a = _CHATMED_A_END.sub("", _CHATMED_A.sub("", req_str(r, "response", ctx), count=1), count=1)
    if not q:
        raise ctx.err("empty (only the 问：/答： wrapper)", "query", "empty_field")
    if not a:
        raise ctx.err("empty (only the wrapper)", "response", "empty_field")
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            "task": ctx.task}


def fmt_huatuogpt_eval(r, ctx):
    # HuatuoGPT eval/ files: Med-dialog_100.json {id, medical_case, doctor_diagnosis, Department}
    # (a case and the doctor's answer) and KUAKE-QIC_100.json {id, label, query} (questions only)
    if "medical_case" in r:
        q = req_str(r, "medical_case", ctx)
        a = req_str(r, "doctor_diagnosis", ctx)
        return {"messages": [{"role": "user", "content": q.strip()},
                             {"role": "assistant", "content": a.strip()}],
                "task": ctx.task or "med-dialog", "subject": opt_str(r, "Department", ctx)}
    req_str(r, "query", ctx)
    raise ctx.err("no answer: an unlabeled split (questions only, e.g. HuatuoGPT's KUAKE-QIC eval "
                  "file); only evaluation by a judge can use it", "query", "unlabeled")


# ---- preference ----------------------------------------------------------------------------

def _pref_answer(v, ctx, key):
    """chosen/rejected as a string, a {from,value}/{role,content} turn, or a list of turns
    (TRL conversational: the last one is the assistant answer)."""
    if isinstance(v, str) or v is None:
        return _content(v, ctx, key)
    if isinstance(v, dict):
        c = v.get("value", v.get("content"))
        return _content(c, ctx, key + (".value" if "value" in v else ".content"))
    if isinstance(v, list) and v:
        last = v[-1]
        if not isinstance(last, dict):
            raise ctx.err(f"wrong type: expected a turn object, got {_tname(last)}",
                          f"{key}[{len(v)-1}]", "wrong_type")
        return _pref_answer(last, ctx, f"{key}[{len(v)-1}]")
    raise ctx.err(f"wrong type: expected a string or a turn, got {_tname(v)}", key, "wrong_type")


def _prompt_msgs(v, ctx, key):
    if isinstance(v, str) or v is None:
        return [{"role": "user", "content": _content(v, ctx, key)}]
    if isinstance(v, list):
        if not v:
            raise ctx.err("empty list", key, "empty_field")
        rk = "role" if isinstance(v[0], dict) and "role" in v[0] else "from"
        ck = "content" if rk == "role" else "value"
        roles = _MSG_ROLES if rk == "role" else _SHAREGPT_ROLES
        return convert_turns(v, ctx, key, rk, ck, roles)
    raise ctx.err(f"wrong type: expected a string or a list of turns, got {_tname(v)}", key,
                  "wrong_type")


def fmt_preference(r, ctx):
    """Three shapes: {prompt, chosen, rejected} (prompt a string or a message list; TRL's
    implicit-prompt form without ``prompt`` takes chosen[:-1]); {question, response_chosen,
    response_rejected}; {conversations, chosen, rejected} (LLaMA-Factory ShareGPT pairs)."""
    if "conversations" in r:
        turns = req_list(r, "conversations", ctx)
        prompt = convert_turns(turns, ctx, "conversations", "from", "value", _SHAREGPT_ROLES)
        key = "conversations"
        ck, rk = "chosen", "rejected"
    elif "response_chosen" in r or "response_rejected" in r:
        prompt = [{"role": "user", "content": req_str(r, "question", ctx)}]
        key = "question"
        ck, rk = "response_chosen", "response_rejected"
    else:
        ck, rk = "chosen", "rejected"
        key = "prompt"
        if "prompt" in r:
            prompt = _prompt_msgs(r["prompt"], ctx, "prompt")
        elif isinstance(r.get("chosen"), list) and len(r["chosen"]) > 1:
            prompt = _prompt_msgs(r["chosen"][:-1], ctx, "chosen")
            key = "chosen"
        else:
            raise ctx.err("missing", "prompt", "missing_field")
    for k in (ck, rk):
        if k not in r:
            raise ctx.err("missing", k, "missing_field")
    chosen = _pref_answer(r[ck], ctx, ck)
    rejected = _pref_answer(r[rk], ctx, rk)
    prompt = _system(r, ctx, prompt)
    if prompt[-1]["role"] != "user":
        raise ctx.err(f"the prompt must end with a user turn (ends with '{prompt[-1]['role']}')",
                      key, "bad_dialogue")
    # chosen == rejected is not an error: the DPO stage warns, drops and counts such pairs
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _label(r, ctx) -> bool:
    """KTO's label: JSON true/false (CSV: true/false/1/0 as text)."""
    if "label" not in r:
        raise ctx.err("missing", "label", "missing_field")
    v = r["label"]
    if isinstance(v, bool):
        return v
    if ctx.container == "csv" and isinstance(v, (str, int)) and str(v).strip().lower() in ("true", "false", "1", "0"):
        return str(v).strip().lower() in ("true", "1")
    if v is None:
        raise ctx.err("is null: expected true (a good answer) or false (a bad one)", "label", "missing_field")
    raise ctx.err(f"wrong type: expected true or false, got {_tname(v)} {v!r}"[:200], "label", "wrong_type")


def fmt_kto(r, ctx):
    """TRL's unpaired preference shape (KTO; MedicalGPT / Zhongjing style feedback): one answer
    per record labelled good or bad, {prompt, completion, label}; prompt a string or a message
    list, completion a string or a list of turns (the last is the answer)."""
    for k in ("prompt", "completion"):
        if k not in r:
            raise ctx.err("missing", k, "missing_field")
    prompt = _system(r, ctx, _prompt_msgs(r["prompt"], ctx, "prompt"))
    completion = _pref_answer(r["completion"], ctx, "completion")
    label = _label(r, ctx)
    if prompt[-1]["role"] != "user":
        raise ctx.err(f"the prompt must end with a user turn (ends with '{prompt[-1]['role']}')",
                      "prompt", "bad_dialogue")
    return {"prompt": prompt, "completion": completion, "label": label}


# ---- multiple choice -----------------------------------------------------------------------

_OPT_LINE = re.compile(r"^\s*([A-Z])\s*(?:[\.\:：、．\)）]\s*|\s+)(.*)$")
_SPLIT_LETTERS = re.compile(r"[A-Z]")
_PUNCT_OPT = re.compile(r"^\s*[A-Z]\s*[\.\:：、．\)）]")  # "B." / "B、": a letter, not a word


def _answer_letters(v, options, ctx, key) -> list[str]:
    if isinstance(v, (list, tuple)):
        s = "".join(str(x) for x in v)
    elif isinstance(v, str):
        s = v
    else:
        raise ctx.err(f"wrong type: expected answer letters, got {_tname(v)}", key, "wrong_type")
    s = s.strip()
    if not s:
        raise ctx.err("empty", key, "empty_field")
    up = s.upper()
    letters = _SPLIT_LETTERS.findall(up)
    rest = _SPLIT_LETTERS.sub("", up)
    if not letters or re.search(r"[^\s,;，；、/|和]", rest):
        raise ctx.err(f"unknown answer {s!r} (expected letters among {''.join(options)})", key,
                      "unknown_answer")
    bad = [x for x in letters if x not in options]
    if bad:
        raise ctx.err(f"unknown answer letter {bad[0]!r} (options are {''.join(options)})", key,
                      "unknown_answer")
    return sorted(set(letters), key=letters.index)


def _check_options(opts: dict, ctx, key):
    if len(opts) < 2:
        raise ctx.err(f"needs at least 2 options, got {len(opts)}", key, "missing_options")
    return opts


def _mcq(ctx, fmt, id_, q, opts, ans, expl=None, subject=None, context=None):
    return {"id": str(id_), "question": q.strip(), "context": context, "options": opts,
            "answer": ans, "explanation": expl, "subject": subject, "task": ctx.task or fmt}


def _has_key(r, key, ctx) -> bool:
    """Is the answer column present? CSV/parquet: the header decides (C-Eval test has no
    answer column → unlabeled); JSON: the record decides (absent = error)."""
    if ctx.file_keys is not None:
        return key in ctx.file_keys
    return True


def _labeled_answer(r, key, opts, ctx) -> list[str]:
    """The answer letters in column `key`; [] for an unlabeled split (a CSV/parquet without the
    column, `_has_key`); a JSON record without it is an error."""
    if key in r:
        return _answer_letters(r[key], opts, ctx, key)
    if not _has_key(r, key, ctx):
        return []
    raise ctx.err("missing", key, "missing_field")


def parse_cmexam_options(s: str, ctx, key="Options") -> dict:
    opts: dict[str, str] = {}
    last = None
    for raw in s.replace("\r\n", "\n").split("\n"):
        if not raw.strip():
            continue
        m = _OPT_LINE.match(raw)
        # an option line's letter comes after the previous one; letters may be skipped (A, B, D,
        # E): D stays D (folding it into B would change which option is the answer)
        if m and m.group(1) in opts and m.group(2).strip() and (
                m.group(1) == last or _PUNCT_OPT.match(raw)):
            # "B ..." twice in a row: merging the second into the first would score the item with
            # one option fewer and maybe the wrong answer text
            raise ctx.err(f"option letter {m.group(1)} repeats ({raw.strip()[:40]!r}); each option "
                          f"needs its own letter", key, "duplicate_option")
        if m and (m.group(1) not in opts) and (last is None or ord(m.group(1)) > ord(last)):
            last = m.group(1)
            opts[last] = m.group(2).strip()
        elif last is not None:
            opts[last] = (opts[last] + "\n" + raw.strip()).strip()
        else:
            raise ctx.err(f"can't read options from {raw.strip()[:40]!r} (expected lines like "
                          f"'A xxx')", key, "missing_options")
    for k, v in opts.items():
        if not v:
            raise ctx.err(f"option {k} is empty", key, "empty_field")
    return _check_options(opts, ctx, key)


def fmt_cmexam(r, ctx):
    q = req_str(r, "Question", ctx)
    opts = parse_cmexam_options(req_str(r, "Options", ctx), ctx)
    if "Answer" in r or not _has_key(r, "Answer", ctx):
        ans = _answer_letters(r["Answer"], opts, ctx, "Answer") if "Answer" in r else []
    else:
        raise ctx.err("missing", "Answer", "missing_field")
    subject = opt_str(r, "Medical Discipline", ctx) or opt_str(r, "Clinical Department", ctx)
    id_ = opt_str(r, "id", ctx) or f"{ctx.stem}-{ctx.line}"
    return _mcq(ctx, "cmexam", id_, q, opts, ans, opt_str(r, "Explanation", ctx), subject)


def fmt_medqa(r, ctx):
    # MedQA (jsonl): {"question", "answer" (text), "options": {"A": ...}, "meta_info",
    #                 "answer_idx", "metamap_phrases"}
    q = req_str(r, "question", ctx)
    o = r.get("options")
    if o is None:
        raise ctx.err("missing", "options", "missing_options")
    if isinstance(o, list):   # some copies store [{"key": "A", "value": ...}] or plain lists
        if o and all(isinstance(x, dict) and "key" in x for x in o):
            o = {str(x["key"]): x.get("value") for x in o}
        else:
            o = {LETTERS[i]: x for i, x in enumerate(o)}
    if not isinstance(o, dict):
        raise ctx.err(f"wrong type: expected an object of options, got {_tname(o)}", "options",
                      "wrong_type")
    opts = {}
    for k, v in o.items():
        if v is None:
            continue  # parquet copies pad missing options (E) with null
        if not isinstance(v, str):
            raise ctx.err(f"wrong type: expected a string, got {_tname(v)}", f"options.{k}",
                          "wrong_type")
        if not v.strip():
            raise ctx.err("empty", f"options.{k}", "empty_field")
        opts[str(k).strip().upper()] = v.strip()
    _check_options(opts, ctx, "options")
    ans = _labeled_answer(r, "answer_idx", opts, ctx)
    txt = r.get("answer")
    if ans and isinstance(txt, str) and txt.strip() and len(ans) == 1 \
            and txt.strip() != opts[ans[0]]:
        raise ctx.err(f"answer text {txt.strip()[:40]!r} is not option {ans[0]} "
                      f"({opts[ans[0]][:40]!r})", "answer", "unknown_answer")
    id_ = opt_str(r, "id", ctx) or f"{ctx.stem}-{str(ctx.line).strip('[]')}"
    return _mcq(ctx, "medqa", id_, q, opts, ans, None, opt_str(r, "meta_info", ctx))


def fmt_medmcqa(r, ctx):
    # MedMCQA: {"question", "exp", "cop", "opa".."opd", "subject_name", "topic_name", "id",
    #           "choice_type"}; cop is 1-4 in the original JSON files, 0-3 in the Hub's parquet
    #           (the source's cop_base says which; -1/null = unlabeled test split)
    q = req_str(r, "question", ctx)
    opts = {}
    for L, k in zip("ABCD", ("opa", "opb", "opc", "opd")):
        if k not in r:
            raise ctx.err("missing", k, "missing_options")
        opts[L] = req_str(r, k, ctx).strip()
    base = ctx.cop_base
    if "cop" not in r:
        if _has_key(r, "cop", ctx):
            raise ctx.err("missing", "cop", "missing_field")
        ans = []
    else:
        c = r["cop"]
        if isinstance(c, str) and c.strip().lstrip("-").isdigit():
            c = int(c)
        if c is None or c == -1 or c == "":
            ans = []
        elif isinstance(c, bool) or not isinstance(c, int):
            raise ctx.err(f"wrong type: expected an integer, got {_tname(c)}", "cop",
                          "wrong_type")
        elif base is None:
            raise ctx.err("set cop_base: 1 (original MedMCQA JSON, cop 1-4) or 0 (the Hub's "
                          "parquet copy, cop 0-3); it is never guessed", "cop", "cop_base")
        elif not 0 <= c - base < 4:
            raise ctx.err(f"unknown answer: cop {c} is outside {base}-{base + 3} "
                          f"(cop_base={base})", "cop", "unknown_answer")
        else:
            ans = ["ABCD"[c - base]]
    return _mcq(ctx, "medmcqa", r.get("id") or f"{ctx.stem}-{ctx.line}", q, opts,
                ans, opt_str(r, "exp", ctx), opt_str(r, "subject_name", ctx))


def medmcqa_cop_base(path: str, container: str, cop_base: int | None) -> int | None:
    """The cop numbering of one MedMCQA file: the source's cop_base, else 1 for the original JSON(-lines)
    files; the Hub's parquet copy numbers 0-3, so a parquet file needs cop_base (never guessed)."""
    if cop_base is not None:
        return cop_base
    if container == "parquet":
        raise DataError("MedMCQA parquet: set cop_base: 0 (the Hub's parquet copy numbers "
                        "cop 0-3) or 1 (original JSON, 1-4); it is never guessed", path,
                        None, "cop_base", reason="cop_base")
    return 1


_PUBMEDQA_OPTS = {"A": "yes", "B": "no", "C": "maybe"}


def fmt_pubmedqa(r, ctx):
    # ori_pqal.json: {pmid: {"QUESTION", "CONTEXTS": [...], "LABELS", "MESHES", "YEAR",
    #   "reasoning_required_pred", "reasoning_free_pred", "final_decision", "LONG_ANSWER"}}
    # also the Hub's pqa_labeled rows: {"pubid", "question", "context": {"contexts": [...]},
    #   "long_answer", "final_decision"}
    if "QUESTION" in r:
        q = req_str(r, "QUESTION", ctx)
        ctxs = req_list(r, "CONTEXTS", ctx)
        cname, long_k = "CONTEXTS", "LONG_ANSWER"
    else:
        q = req_str(r, "question", ctx)
        c = r.get("context")
        if isinstance(c, dict):
            ctxs = req_list(c, "contexts", ctx, "context.contexts")
        else:
            ctxs = req_list(r, "context", ctx)
        cname, long_k = "context", "long_answer"
    for i, c in enumerate(ctxs):
        if not isinstance(c, str):
            raise ctx.err(f"wrong type: expected a string, got {_tname(c)}", f"{cname}[{i}]",
                          "wrong_type")
    context = "\n".join(c.strip() for c in ctxs if c.strip())
    if not context:
        raise ctx.err("empty", cname, "empty_field")
    if "final_decision" in r:
        d = req_str(r, "final_decision", ctx).strip().lower()
        inv = {v: k for k, v in _PUBMEDQA_OPTS.items()}
        if d not in inv:
            raise ctx.err(f"unknown answer {d!r} (expected yes/no/maybe)", "final_decision",
                          "unknown_answer")
        ans = [inv[d]]
    elif not _has_key(r, "final_decision", ctx) or ("QUESTION" in r and "reasoning_required_pred" not in r):
        # unlabeled: C-Eval-style files without the column, and ori_pqau.json (PQA-U records carry
        # no final_decision and no reasoning_*_pred, which every PQA-L record has)
        ans = []
    else:
        raise ctx.err("missing", "final_decision", "missing_field")
    id_ = r.get("_key") or r.get("pubid") or f"{ctx.stem}-{ctx.line}"
    return _mcq(ctx, "pubmedqa", id_, q, dict(_PUBMEDQA_OPTS), ans, opt_str(r, long_k, ctx),
                None, context)


_CEVAL_NAME = re.compile(r"^(?P<subject>.+?)_(?P<split>dev|val|test)$")


def fmt_ceval(r, ctx):
    # C-Eval CSV: id,question,A,B,C,D,answer[,explanation]  (dev has explanation; test has no
    # answer column → unlabeled). Subject from the file name "<subject>_<split>.csv".
    q = req_str(r, "question", ctx)
    opts = {}
    for L in "ABCD":
        if L not in r:
            raise ctx.err("missing", L, "missing_options")
        opts[L] = req_str(r, L, ctx).strip()
    for L in "EF":
        if r.get(L) not in (None, ""):
            opts[L] = req_str(r, L, ctx).strip()
    ans = _labeled_answer(r, "answer", opts, ctx)
    m = _CEVAL_NAME.match(ctx.stem)
    subject = m.group("subject") if m else None
    id_ = opt_str(r, "id", ctx) or str(ctx.line)
    return _mcq(ctx, "ceval", f"{subject}-{id_}" if subject else id_, q, opts, ans,
                opt_str(r, "explanation", ctx), subject)


def fmt_mmlu(r, ctx):
    # MMLU (hendrycks/test release, data/{dev,val,test}/<subject>_<split>.csv): header-less rows
    # question,A,B,C,D,answer (readers.py names the cells). Options are kept as the cells are: the
    # Hub copy (cais/mmlu) that lm-eval prompts with holds them unstripped, and some are empty.
    q = req_str(r, "question", ctx)
    opts = {}
    for L in "ABCD":
        v = r.get(L)
        if v is None:
            raise ctx.err("missing", L, "missing_options")
        opts[L] = str(v)
    ans = _answer_letters(r.get("answer") or "", opts, ctx, "answer")
    if len(ans) != 1:
        raise ctx.err(f"expected one answer letter, got {r.get('answer')!r}", "answer", "unknown_answer")
    m = _CEVAL_NAME.match(ctx.stem)
    subject = m.group("subject") if m else ctx.stem
    return _mcq(ctx, "mmlu", f"{subject}-{ctx.line}", q, opts, ans, None, subject)


def fmt_cmb(r, ctx):
    # CMB-Exam (FreedomIntelligence/CMB, data/CMB.zip → CMB-Exam/CMB-val/CMB-val-merge.json,
    # CMB-test/CMB-test-choice-question-merge.json): a JSON array of {exam_type, exam_class,
    # exam_subject, question, answer ("D", or "ABD" for 多项选择题), question_type (单项选择题 |
    # 多项选择题), option {"A": ..}, explanation (val)}; test items carry an `id` and no answer (the
    # answers are published apart, CMB-test-choice-answer.json) → unlabeled. Empty options (a 4-option
    # item's "E": "") are dropped; exam_type/exam_class/question_type stay on the record (OpenCompass's
    # CMB prompt names them).
    q = req_str(r, "question", ctx)
    o = r.get("option")
    if not isinstance(o, dict):
        raise ctx.err("missing" if o is None else f"wrong type: expected an object of options, got {_tname(o)}",
                      "option", "missing_options" if o is None else "wrong_type")
    opts = {}
    for k, v in o.items():
        if not isinstance(v, (str, int, float)) or isinstance(v, bool):
            raise ctx.err(f"wrong type: expected a string, got {_tname(v)}", f"option.{k}", "wrong_type")
        if str(v).strip():
            opts[str(k).strip().upper()] = str(v).strip()
    _check_options(opts, ctx, "option")
    ans = _answer_letters(r["answer"], opts, ctx, "answer") if "answer" in r else []
    qtype = opt_str(r, "question_type", ctx)
    if ans and len(ans) > 1 and qtype == "单项选择题":
        raise ctx.err(f"answer {r['answer']!r} has {len(ans)} letters but question_type is 单项选择题", "answer",
                      "unknown_answer")
    id_ = opt_str(r, "id", ctx) or f"{ctx.stem}-{str(ctx.line).strip('[]')}"
    rec = _mcq(ctx, "cmb", id_, q, opts, ans, opt_str(r, "explanation", ctx), opt_str(r, "exam_subject", ctx))
    rec.update(exam_type=opt_str(r, "exam_type", ctx) or "", exam_class=opt_str(r, "exam_class", ctx) or "",
               question_type=qtype or "")
    return rec


# ---- registry ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Format:
    name: str
    kind: str          # text | qa | chat | preference | feedback | mcq
    fn: object
    keys: frozenset    # keys that identify the shape for auto-detection (all required)
    doc: str = ""
    cop_base: object = None  # (path, container, the source's cop_base) -> this file's cop_base (MedMCQA)
    answer_field: str = "answer"  # the file's answer field (named when an unlabeled record is refused)
    evaluated_as: str | None = None  # the eval set kind it makes: mcq | generation | promptcblue; None: not evaluable


def _f(name, kind, fn, *keysets, **options):
    return [Format(name, kind, fn, frozenset(ks), **options) for ks in keysets]


_ALL = [
    *_f("text", "text", fmt_text, {"text"}, doc="pretraining text: txt lines, or a text field"),
    *_f("huatuo", "qa", fmt_huatuo, {"question", "answer", "related_diseases"},
        {"question", "answer", "label"}, {"questions", "answers"}, doc="Huatuo-26M QA", evaluated_as="generation"),
    *_f("alpaca", "chat", fmt_alpaca, {"instruction", "output"}, doc="instruction/input/output",
        evaluated_as="generation"),
    *_f("sharegpt", "chat", fmt_sharegpt, {"conversations"}, doc="conversations from/value",
        evaluated_as="generation"),
    *_f("messages", "chat", fmt_messages, {"messages"}, doc="OpenAI messages role/content",
        evaluated_as="generation"),
    *_f("chatmed", "chat", fmt_chatmed, {"query", "response"}, doc="ChatMed query/response"),
    *_f("huatuogpt_eval", "chat", fmt_huatuogpt_eval, {"medical_case", "doctor_diagnosis"},
        {"id", "label", "query"}, doc="HuatuoGPT eval/ files (Med-dialog, KUAKE-QIC)"),
    *_f("paragraphs", "text", fmt_text, {"\0paragraphs"},
        doc="hard-wrapped .txt: one document per blank-line-separated paragraph"),
    *_f("promptcblue", "chat", fmt_promptcblue, {"input", "target", "task_type"},
        {"input", "target", "answer_choices"}, doc="PromptCBLUE input/target",
        evaluated_as="promptcblue"),  # scored on its raw rows by PromptCBLUE's own metrics
    *_f("preference", "preference", fmt_preference, {"prompt", "chosen", "rejected"},
        {"chosen", "rejected"},
        {"question", "response_chosen", "response_rejected"},
        {"conversations", "chosen", "rejected"}, doc="the three preference shapes"),
    *_f("kto", "feedback", fmt_kto, {"prompt", "completion", "label"},
        doc="unpaired good/bad answers (TRL KTO: prompt, completion, label)"),
    *_f("cmexam", "mcq", fmt_cmexam, {"Question", "Options", "Answer"}, {"Question", "Options"},
        doc="CMExam CSV", answer_field="Answer", evaluated_as="mcq"),
    *_f("medqa", "mcq", fmt_medqa, {"question", "options", "answer_idx"},
        {"question", "options"}, doc="MedQA jsonl", answer_field="answer_idx", evaluated_as="mcq"),
    *_f("medmcqa", "mcq", fmt_medmcqa, {"question", "opa", "opb", "cop"},
        {"question", "opa", "opb"}, doc="MedMCQA", cop_base=medmcqa_cop_base, answer_field="cop",
        evaluated_as="mcq"),
    *_f("pubmedqa", "mcq", fmt_pubmedqa, {"QUESTION", "CONTEXTS"},
        {"pubid", "question", "final_decision"}, doc="PubMedQA ori_pqal.json", answer_field="final_decision",
        evaluated_as="mcq"),
    *_f("ceval", "mcq", fmt_ceval, {"id", "question", "A", "B", "C", "D"},
        {"question", "A", "B", "C", "D"}, doc="C-Eval CSV", evaluated_as="mcq"),
    *_f("mmlu", "mcq", fmt_mmlu, {"\0mmlu"},
        doc="MMLU CSV (hendrycks/test: header-less question,A,B,C,D,answer; detected by detect.py)",
        evaluated_as="mcq"),
    *_f("cmb", "mcq", fmt_cmb, {"question", "option", "exam_type"}, doc="CMB-Exam JSON", evaluated_as="mcq"),
]

SHAPES: list[Format] = _ALL
FORMATS: dict[str, Format] = {}
for _fm in _ALL:
    FORMATS.setdefault(_fm.name, _fm)

FORMAT_ALIASES = {"txt": "text", "openai": "messages",
                  "chatml": "messages", "huatuo26m": "huatuo", "cblue": "promptcblue",
                  "dpo": "preference", "unpaired": "kto", "c-eval": "ceval", "pqal": "pubmedqa"}
