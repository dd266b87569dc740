"""Chat data for training: the chat-template check, assistant-only loss masks, the tokenised
dataset (cached on disk, prepared once per node). Shared by every kind that trains on
conversations (sft, MedCare, C-Poly).

Assistant masks come from ONE rendering of each conversation: the rendered text is tokenised
once with offsets, each message's content is located in it (in order, never inside a special
token, anchored on the text the template puts before an assistant answer), and a token is
trained iff its characters overlap an assistant span = the answer's content plus the template's
end of turn (the ``</s>``/``<|im_end|>\\n`` it prints after an answer). This gives the same
masks as rendering prefix by prefix on templates that render that way (tests/test_sft_encoding),
and also works for those that do not (Mistral v0.3 moves the system prompt into the last user
turn, Baichuan prints ``</s>`` only after the final answer). A template that drops the system
prompt or refuses a system role (Mistral v0.3 with a final assistant turn, Gemma) gets it folded
into the first user turn, which is what those models' cards recommend; this is counted.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENCODING_VERSION = "offsets-v2"  # bump when the encoding changes: old caches are not reused
END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>")
OVERLENGTH = ("truncate", "drop", "error")


# ---- the check before training -----------------------------------------------------------------

def check_chat_data(params: Any, base: Any, data_opts: dict) -> list[str]:
    """Before any training: every record reads, renders with the stage's own tokenizer and
    template, its assistant spans are found; token lengths per source; the over-length policy is
    applied and counted; a stage whose data would come out empty is refused. The encoded data
    is cached under the key `run` uses, so the stage memory-maps it instead of encoding again."""
    tok = load_stage_tokenizer(base.tokenizer_path, params, base.trust_remote_code)
    prepared = prepare_chat_data(params, data_opts, tok, cache_dir_of(data_opts), table=True)
    return prepared.lines


class Prepared:
    """What prepare_chat_data returns: train/held-out datasets, stats, the summary lines."""

    def __init__(self, train, heldout, stats, lines):
        self.train, self.heldout, self.stats, self.lines = train, heldout, stats, lines


def chat_fingerprint(params: Any, data_opts: dict, split: str) -> str:
    """Data fingerprint of a stage's chat data: the files' digests + spec + loader options (not
    the conversations themselves): computable before reading a record."""
    from medpipe.data import fingerprint
    from medpipe.stages.training.params import data_options

    return fingerprint(params.data, want="chat", split=split, heldout=getattr(params, "heldout", 0.0),
                       **data_options(params, data_opts))


def cache_dir_of(data_opts: dict) -> Path:
    cache = data_opts.get("cache_dir")
    return Path(cache).expanduser() if cache else _default_cache()


def prepare_chat_data(params: Any, data_opts: dict, tok: Any, cache_dir: Path, *, table: bool = False,
                      log: Any = None) -> Prepared:
    """Encoded train (and held-out) conversations. When both are in the cache they are memory-
    mapped without reading a record (the path of every rank but the one that prepared them, and
    of `run` after `validate`); otherwise the records are read, validated, encoded and cached."""
    from medpipe.data import load_records
    from medpipe.data.arrow import chat_arrow, streamable
    from medpipe.errors import MedpipeError
    from medpipe.stages.training.params import data_options

    limits = Limits.of(params, data_opts)
    if limits.overlength not in OVERLENGTH:
        raise MedpipeError(f"overlength: {limits.overlength!r} is not one of {', '.join(OVERLENGTH)}")
    opts = data_options(params, data_opts)
    held = getattr(params, "heldout", 0.0) > 0
    fps = {split: chat_fingerprint(params, data_opts, split) for split in (("train", "heldout") if held else ("train",))}
    num_proc = getattr(params, "num_proc", None)
    stats, lines = EncodeStats(), []
    if not table and all(_cached(cache_dir, fp, tok, limits) for fp in fps.values()):
        train = encode_dataset([], tok, limits.max_length, cache_dir, limits=limits, fingerprint=fps["train"], stats=stats)
        heldout = encode_dataset([], tok, limits.max_length, cache_dir, limits=limits,
                                 fingerprint=fps["heldout"]) if held else None
    elif not held and streamable(params.data):
        # records flow as memory-mapped Arrow from the reader to the encoder (bounded memory)
        work = Path(cache_dir) / f"read-{os.getpid()}"
        try:
            arrow = chat_arrow(params.data, work, seed=opts["seed"], on_error=opts["on_error"])
            train = encode_dataset(arrow.dataset, tok, limits.max_length, cache_dir, limits=limits,
                                   fingerprint=fps["train"], num_proc=num_proc, on_error=opts["on_error"], stats=stats)
        finally:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
        heldout = None
        if table:
            _token_columns(arrow.reports, stats.lengths, limits.max_length)
            lines = arrow.summary_table().splitlines()
    else:
        result = load_records(params.data, "chat", heldout=getattr(params, "heldout", 0.0), **opts)
        _tag_sources(params.data, result.records)
        train = encode_dataset(result.records, tok, limits.max_length, cache_dir, limits=limits, fingerprint=fps["train"],
                               num_proc=num_proc, on_error=opts["on_error"], stats=stats)
        if table:
            _token_columns(result.reports, stats.lengths, limits.max_length)
            lines = result.summary_table().splitlines()
        heldout = encode_dataset(result.heldout, tok, limits.max_length, cache_dir, limits=limits,
                                 fingerprint=fps["heldout"], num_proc=num_proc,
                                 on_error=opts["on_error"]) if held and result.heldout else None
    lines += stats.lines()
    if len(train) == 0:
        raise MedpipeError(f"no conversation keeps an assistant token (max_length={limits.max_length}, "
                           f"overlength={limits.overlength}): {stats.no_assistant} of {stats.read} lost every answer "
                           f"token, {stats.overlength_dropped} dropped as over-length, {stats.failed} failed; "
                           f"raise max_length or lower max_prompt_length")
    if log is not None:
        log.info("chat data %s: %d conversations (%s)", "prepared by this process" if stats.prepared_by ==
                 "this process" else "memory-mapped from the cache", len(train), cache_dir)
    return Prepared(train, heldout, stats, lines)


def _tag_sources(spec: Any, records: list[dict]) -> None:
    """records[i]["_src"] = index of the source its file belongs to (for per-source lengths)."""
    from medpipe.data import parse_spec
    from medpipe.data.sources import expand_paths

    of = {f: i for i, src in enumerate(parse_spec(spec)) for f in expand_paths(src)}
    for r in records:
        r["_src"] = of.get(str(r.get("_loc", "")).rpartition(":")[0], 0)


def _token_columns(reports, lengths: dict, max_length: int) -> None:
    """p50/p90/p99/max token length per source from the encoding itself (every record, exact,
    after the prompt/answer cuts, before the max_length cut) and how many are over max_length."""
    import numpy as np

    for i, rep in enumerate(reports):
        n = np.sort(np.asarray(lengths.get(i, []), dtype=np.int64))
        if not len(n):
            continue
        pick = lambda q: int(n[min(len(n) - 1, max(0, int(round(q / 100 * (len(n) - 1)))))])  # noqa: E731
        rep.token_p50, rep.token_p90, rep.token_p99, rep.token_max = pick(50), pick(90), pick(99), int(n[-1])
        rep.token_sample = len(n)
        rep.overlength = int((n > max_length).sum())


def _cached(cache_dir: Path, fp: str, tok: Any, limits: "Limits") -> bool:
    return (Path(cache_dir) / f"sft-{cache_key(fp, tok, limits)}" / "dataset_info.json").is_file()


def _default_cache() -> Path:
    from medpipe.paths import cache_root

    return cache_root() / "data"


def require_model_dir(model_path: str) -> None:
    """A local model directory the loader can build a model from: not empty, has config.json
    (a tokenizer alone passes AutoTokenizer and then fails at training as "Unrecognized model")."""
    from medpipe.errors import MedpipeError

    p = Path(model_path)
    if not p.is_dir():
        return  # a Hub id (allow_hub) or a model source's output: the loader decides
    if not any(p.iterdir()):
        raise MedpipeError(f"model.path {model_path}: the directory is empty (no model was saved there)")
    if not (p / "config.json").is_file():
        raise MedpipeError(f"model.path {model_path}: no config.json (a tokenizer alone is not a model; point "
                           f"model.path at the checkpoint directory)")


def load_stage_tokenizer(tokenizer_path: str, params: Any, trust_remote_code: bool):
    """The stage's tokenizer with the template it will train with; one line when there is none."""
    from medpipe.errors import MedpipeError
    from medpipe.stages.models.loader import load_tokenizer

    require_model_dir(tokenizer_path)
    try:
        tok = load_tokenizer(tokenizer_path, trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise MedpipeError(f"model.path {tokenizer_path}: no tokenizer can be loaded from it "
                           f"({str(e).splitlines()[0][:160]})") from None
    if getattr(params, "chat_template", None):
        tok.chat_template = params.chat_template
    if not tok.chat_template:
        raise MedpipeError(f"the tokenizer at {tokenizer_path} has no chat template, which SFT needs; "
                           f"set chat_template on the stage (a Jinja string) or use a chat model's tokenizer")
    return tok


def require_chat_template(tokenizer_path: str, params: Any, trust_remote_code: bool) -> None:
    load_stage_tokenizer(tokenizer_path, params, trust_remote_code)


# ---- limits ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    """max_length cuts the whole conversation; max_prompt_length / max_response_length cut each
    prompt run (the user text's end goes first, the template's turn markers stay) and each answer
    (its end goes) separately (Qilin-Med: 256 / 256). overlength: what happens to a conversation
    still longer than max_length: truncate (keep its start) | drop (counted) | error."""

    max_length: int
    max_prompt_length: int | None = None
    max_response_length: int | None = None
    overlength: str = "truncate"

    @staticmethod
    def of(params: Any, data_opts: dict | None = None) -> "Limits":
        over = getattr(params, "overlength", None) or (data_opts or {}).get("overlength") or "truncate"
        return Limits(params.max_length, getattr(params, "max_prompt_length", None),
                      getattr(params, "max_response_length", None), over)


@dataclass
class EncodeStats:
    read: int = 0
    kept: int = 0
    prompt_cut: int = 0        # conversations with a prompt run cut to max_prompt_length
    response_cut: int = 0      # ... an answer cut to max_response_length
    truncated: int = 0         # ... cut to max_length (overlength=truncate)
    overlength_dropped: int = 0
    no_assistant: int = 0      # no answer token left after the cuts: dropped
    system_folded: int = 0     # template drops/refuses the system turn: folded into the first user turn
    multi_turn: int = 0        # kept conversations with more than one answer
    failed: int = 0            # on_error=skip: template/span errors dropped
    prepared_by: str = ""      # "this process" or "cache" (memory-mapped)
    errors: list = field(default_factory=list)
    lengths: dict = field(default_factory=dict, repr=False)  # source index -> token lengths (this run only)

    def lines(self) -> list[str]:
        out = [f"encoded: {self.kept}/{self.read} conversations kept"
               f" (prompt cut {self.prompt_cut}, answer cut {self.response_cut}, truncated to max_length "
               f"{self.truncated}, over max_length dropped {self.overlength_dropped}, no answer token left "
               f"{self.no_assistant}, system folded into the first user turn {self.system_folded}"
               + (f", template/span errors {self.failed}" if self.failed else "") + ")"]
        out += [f"  {e}" for e in self.errors[:5]]
        return out


# ---- one conversation --------------------------------------------------------------------------

class SpanError(ValueError):
    """An assistant answer cannot be located in the rendering (or the template refuses the chat)."""


@dataclass(frozen=True)
class TemplateShape:
    """What a template prints around an answer, learnt once per tokenizer from a probe chat."""

    before: str          # text right before an answer's content (e.g. "<|im_start|>assistant\n")
    after: str           # text right after a final answer (e.g. "<|im_end|>\n", " </s>", "")
    end_of_turn: tuple   # end-of-turn strings this tokenizer knows
    specials: tuple      # special-token strings (content is never matched inside one)


_U, _A = "medpipe probe question 7", "medpipe probe answer 9"


def template_shape(tok: Any) -> TemplateShape:
    specials = tuple(sorted({s for s in getattr(tok, "all_special_tokens", []) if s}, key=len, reverse=True))
    eots = tuple(s for s in dict.fromkeys([*END_OF_TURN, getattr(tok, "eos_token", None)])
                 if s and (s in specials or s == getattr(tok, "eos_token", None)))
    before = after = ""
    try:
        text = tok.apply_chat_template([{"role": "user", "content": _U}, {"role": "assistant", "content": _A}],
                                       tokenize=False)
        i, j = text.find(_U), text.find(_A)
        if 0 <= i < j:
            between = text[i + len(_U):j]
            before = between[-_common_tail(between):] if between else ""
            after = text[j + len(_A):]
    except Exception:  # noqa: BLE001 - a template that refuses the probe: anchors stay empty
        pass
    return TemplateShape(before, after, eots, specials)


def _common_tail(between: str) -> int:
    # the part of "user end + assistant header" that belongs to the header: after the last
    # end-of-turn/newline boundary is good enough as an anchor; keep at most 32 chars
    return min(len(between), 32)


def render(messages: list[dict], tok: Any) -> tuple[str, bool]:
    """(rendered text, system folded?) — a template that refuses or drops the system turn gets it
    folded into the first user turn."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    try:
        text = tok.apply_chat_template(messages, tokenize=False)
        if system is None or system.strip() in text:
            return text, False
    except Exception as e:  # noqa: BLE001 - jinja raise_exception / TemplateError
        if system is None:
            raise SpanError(f"the chat template refuses this conversation: {str(e).splitlines()[0][:160]}") from None
    folded = [dict(messages[1], content=system.strip() + "\n\n" + messages[1]["content"]), *messages[2:]]
    try:
        return tok.apply_chat_template(folded, tokenize=False), True
    except Exception as e:  # noqa: BLE001
        raise SpanError(f"the chat template refuses this conversation: {str(e).splitlines()[0][:160]}") from None


def _special_spans(text: str, specials: tuple) -> list[tuple[int, int]]:
    spans = []
    for sp in specials:
        i = text.find(sp)
        while i >= 0:
            spans.append((i, i + len(sp)))
            i = text.find(sp, i + len(sp))
    return spans


def _find(text: str, needle: str, start: int, forbidden, before: str) -> tuple[int, int] | None:
    """First occurrence at/after start not inside a special token; for answers, prefer one that
    the template's answer header precedes (so an answer "assistant" is not found in a header)."""
    first = None
    i = text.find(needle, start)
    while i >= 0:
        j = i + len(needle)
        if not any(a < j and i < b for a, b in forbidden):
            if not before or text.endswith(before, 0, i):
                return i, j
            first = first or (i, j)
        i = text.find(needle, i + 1)
    return first


def assistant_spans(text: str, messages: list[dict], shape: TemplateShape, folded: bool = False) -> list[tuple]:
    """[(start, end, content_start, content_end)] per assistant message; (start, end) is trained.
    User contents give (-1, -1, s, e) entries (the prompt text that max_prompt_length may cut)."""
    forbidden = _special_spans(text, shape.specials)
    msgs = messages[1:] if folded else messages
    cursor, out = 0, []
    for k, m in enumerate(msgs):
        if m["role"] == "system":
            continue
        c = m["content"]
        is_answer = m["role"] == "assistant"
        anchor = shape.before if is_answer else ""
        hit = _find(text, c, cursor, forbidden, anchor)
        if hit is None and c.strip() != c:  # templates that trim content (Llama-2, Mistral, Gemma)
            hit = _find(text, c.strip(), cursor, forbidden, anchor)
        if hit is None and folded and k == 0:
            hit = _find(text, c.strip(), cursor, forbidden, "")
        if hit is None:
            raise SpanError(f"messages[{k + (1 if folded else 0)}] ({m['role']}): its content is not in the "
                            f"rendering after character {cursor} (the template drops or rewrites it)")
        s, e = hit
        end = e
        if is_answer:
            tail = text[e:]
            if shape.after and tail.startswith(shape.after):
                end = e + len(shape.after)
            else:
                gap = len(tail) - len(tail.lstrip(" "))
                for eot in shape.end_of_turn:
                    if gap <= 2 and tail.startswith(eot, gap):
                        end = e + gap + len(eot)
                        break
            out.append((s, end, s, e))
        else:
            out.append((-1, -1, s, e))
        cursor = end
    return out


def _token_classes(offsets, spans):
    """Per token (numpy int8): 2 trained (answer), 1 user content (prompt text), 0 template. A
    token belongs to a span when their characters overlap."""
    import numpy as np

    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    a, b = off[:, 0], off[:, 1]
    cls = np.zeros(len(off), dtype=np.int8)
    for value, pairs in ((1, [(s, e) for x, _, s, e in spans if x < 0]), (2, [(s, e) for s, e, _, _ in spans if s >= 0])):
        if not pairs:
            continue
        starts = np.fromiter((p[0] for p in pairs), np.int64, len(pairs))
        ends = np.fromiter((p[1] for p in pairs), np.int64, len(pairs))
        k = np.searchsorted(ends, a, side="right")  # first span ending after the token starts
        inside = k < len(pairs)
        hit = inside & (b > a)
        hit[inside] &= starts[k[inside]] < b[inside]
        cls[hit] = value
    return cls


_TRAINED = bytes(int(c == 2) for c in range(256))


def _cut_runs(ids: list[int], cls, limits: Limits) -> tuple[list[int], list[int], bool, bool]:
    """Cut every prompt run (tokens between answers) to max_prompt_length by dropping the end of
    its user text, and every answer to max_response_length by dropping its end."""
    if not limits.max_prompt_length and not limits.max_response_length:
        # class 2 -> 1, others -> 0 through one bytes.translate (C speed; the per-token list
        # comprehension was 5% of the profiled encode time at 20k conversations)
        return list(ids), list(bytes(cls if isinstance(cls, list) else cls.astype("uint8").tobytes())
                               .translate(_TRAINED)), False, False
    if not isinstance(cls, list):
        cls = cls.tolist()
    out_ids, out_mask = [], []
    p_cut = r_cut = False
    i, n = 0, len(ids)
    while i < n:
        trained = cls[i] == 2
        j = i
        while j < n and (cls[j] == 2) == trained:
            j += 1
        run = list(range(i, j))
        if trained and limits.max_response_length and len(run) > limits.max_response_length:
            run, r_cut = run[:limits.max_response_length], True
        elif not trained and limits.max_prompt_length and len(run) > limits.max_prompt_length:
            excess = len(run) - limits.max_prompt_length
            drop = set()
            for k in reversed(run):  # the end of the user text goes first; template markers stay
                if len(drop) == excess:
                    break
                if cls[k] == 1:
                    drop.add(k)
            run = [k for k in run if k not in drop]
            if len(run) > limits.max_prompt_length:  # still too long (template text): keep the end
                run = run[-limits.max_prompt_length:]
            p_cut = True
        out_ids += [ids[k] for k in run]
        out_mask += [int(trained)] * len(run)
        i = j
    return out_ids, out_mask, p_cut, r_cut


def encode_chat(messages: list[dict], tok: Any, max_length: int, *, limits: Limits | None = None,
                shape: TemplateShape | None = None) -> dict:
    """Token ids and a mask that is 1 exactly on assistant tokens (every assistant turn), cut to
    the limits (max_length keeps the start). Raises SpanError."""
    limits = limits or Limits(max_length)
    rows = _encode_many([messages], tok, shape or template_shape(tok), limits)
    row = rows[0]
    if row["error"]:
        raise SpanError(row["error"])
    return {"input_ids": row["input_ids"], "assistant_masks": row["assistant_masks"]}


def _span_classes(enc, n: int, spans) -> list[int]:
    """Token classes from a Rust Encoding without materialising its offsets: each span's first
    and last token by char_to_token (a token belongs to a span when it covers one of its chars)."""
    cls = [0] * n

    def token_at(pos, end, step):
        while pos != end:
            t = enc.char_to_token(pos)
            if t is not None:
                return t
            pos += step
        return None

    for value, pairs in ((1, [(s, e) for x, _, s, e in spans if x < 0]), (2, [(s, e) for s, e, _, _ in spans if s >= 0])):
        for s, e in pairs:
            if e <= s:
                continue
            t0, t1 = token_at(s, e, 1), token_at(e - 1, s - 1, -1)
            if t0 is not None and t1 is not None and t1 >= t0:
                cls[t0:t1 + 1] = [value] * (t1 - t0 + 1)
    return cls


def _tokenize(texts: list[str], tok: Any) -> list[tuple[list[int], Any]]:
    """(ids, Rust Encoding or char offsets) per text, no special tokens added (the template
    prints its own); the Rust backend directly when the tokenizer is a fast one."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        if backend.truncation is not None:
            backend.no_truncation()
        if backend.padding is not None:
            backend.no_padding()
        return [(e.ids, e) for e in backend.encode_batch(texts, add_special_tokens=False)]
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False,
              return_token_type_ids=False)
    return list(zip(enc["input_ids"], enc["offset_mapping"]))


def _encode_many(convs: list[list[dict]], tok: Any, shape: TemplateShape, limits: Limits) -> list[dict]:
    texts, spans, folded, errors = [], [], [], []
    for msgs in convs:
        try:
            text, fold = render(msgs, tok)
            spans.append(assistant_spans(text, msgs, shape, fold))
            texts.append(text)
            folded.append(fold)
            errors.append("")
        except SpanError as e:
            texts.append("")
            spans.append([])
            folded.append(False)
            errors.append(str(e))
    encoded = _tokenize(texts, tok)
    rows = []
    for k in range(len(convs)):
        ids, offs = encoded[k]
        cls = _token_classes(offs, spans[k]) if isinstance(offs, list) else _span_classes(offs, len(ids), spans[k])
        ids, mask, p_cut, r_cut = _cut_runs(ids, cls, limits)
        over = len(ids) > limits.max_length
        rows.append({"input_ids": ids[:limits.max_length], "assistant_masks": mask[:limits.max_length],
                     "error": errors[k], "prompt_cut": p_cut, "response_cut": r_cut, "overlength": over,
                     "folded": folded[k], "has_answer": any(mask[:limits.max_length]),
                     "answers": sum(1 for a, *_ in spans[k] if a >= 0), "n_tokens": len(ids)})
    return rows


# ---- the dataset -------------------------------------------------------------------------------

def records_digest(records: list[dict]) -> str:
    """Streaming sha256 of the conversations (no giant string); used when the caller has no data
    fingerprint of its own."""
    h = hashlib.sha256(b"chat-records\0")
    for r in records:
        h.update(json.dumps(r["messages"], ensure_ascii=False, separators=(",", ":")).encode())
        h.update(b"\0")
    return h.hexdigest()


def cache_key(data_fp: str, tok: Any, limits: Limits) -> str:
    from medpipe.data.pack import tokenizer_digest

    h = hashlib.sha256(f"{ENCODING_VERSION}|{data_fp}|{tokenizer_digest(tok)}|{tok.chat_template}|".encode())
    h.update(json.dumps(limits.__dict__, sort_keys=True).encode())
    return h.hexdigest()[:20]


def default_num_proc(n_records: int) -> int | None:
    """The cores this process may use, but no more than one per 2,000 conversations (starting a
    worker costs more than encoding a few hundred)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = min(cores, max(1, n_records // 2000))
    return n if n > 1 else None


def _encoded_features():
    """Compact columns: ids int32, masks int8 (python ints would be stored as int64: 16 bytes a token)."""
    from datasets import Features, List, Value

    return Features({"input_ids": List(Value("int32")), "assistant_masks": List(Value("int8")),
                     "error": Value("string"), "prompt_cut": Value("bool"), "response_cut": Value("bool"),
                     "overlength": Value("bool"), "folded": Value("bool"), "has_answer": Value("bool"),
                     "answers": Value("int32"), "n_tokens": Value("int32"), "_loc": Value("string"),
                     "_src": Value("int32")})


def _map_batch(batch, tok, shape, limits):
    rows = _encode_many(batch["messages"], tok, shape, limits)
    out = {k: [r[k] for r in rows] for k in rows[0]} if rows else {}
    out["_loc"], out["_src"] = batch["_loc"], batch["_src"]
    return out


def encode_dataset(records: list[dict], tok: Any, max_length: int, cache_dir=None, *, limits: Limits | None = None,
                   fingerprint: str | None = None, num_proc: int | None = None, on_error: str = "fail",
                   stats: EncodeStats | None = None, log: Any = None):
    """Tokenised conversations (input_ids, assistant_masks) as a memory-mapped Arrow dataset.

    Encoded with a batched ``datasets.map`` (``num_proc`` processes, default: the cores available),
    cached in ``cache_dir`` under (data fingerprint, tokenizer, template, limits): a rerun, a
    second rank and `run` after `validate` memory-map the cache. Over-length policy and template
    errors as ``limits``/``on_error`` say; a record that fails names its file:line."""
    from medpipe.data import DataError

    limits = limits or Limits(max_length)
    stats = stats if stats is not None else EncodeStats()
    stats.read = len(records)
    key = cache_key(fingerprint or records_digest(records), tok, limits)
    path = Path(cache_dir) / f"sft-{key}" if cache_dir is not None else None
    if path is not None and (path / "dataset_info.json").is_file():
        return _load_cached(path, stats)
    ds = _encode(records, tok, limits, num_proc)
    ds = _apply_policy(ds, limits, on_error, stats, DataError)
    if path is None or len(ds) == 0:  # datasets cannot load an empty saved dataset back
        stats.prepared_by = "this process"
        return ds
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    ds.save_to_disk(str(tmp))
    (tmp / "medpipe_stats.json").write_text(json.dumps({k: v for k, v in stats.__dict__.items()
                                                        if k not in ("prepared_by", "lengths")}))
    _save_lengths(tmp, stats.lengths)
    try:
        tmp.rename(path)
    except OSError:  # another process cached it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return _load_cached(path, stats, prepared=True)


def _save_lengths(path: Path, lengths: dict) -> None:
    import numpy as np

    np.savez_compressed(path / "medpipe_lengths.npz", **{str(k): np.asarray(v, dtype=np.int32) for k, v in lengths.items()})


def _load_lengths(path: Path) -> dict:
    import numpy as np

    f = path / "medpipe_lengths.npz"
    if not f.is_file():
        return {}
    with np.load(f) as z:
        return {int(k): z[k].tolist() for k in z.files}


def _load_cached(path: Path, stats: EncodeStats, prepared: bool = False):
    from datasets import load_from_disk

    saved = path / "medpipe_stats.json"
    if saved.is_file() and not prepared:
        stats.__dict__.update(json.loads(saved.read_text()))
        stats.lengths = _load_lengths(path)
    stats.prepared_by = "this process" if prepared else "cache"
    return load_from_disk(str(path))  # memory-mapped Arrow files


def _encode(records: list[dict], tok: Any, limits: Limits, num_proc: int | None):
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    shape = template_shape(tok)
    if not isinstance(records, list):  # already Arrow (medpipe.data.arrow): columns messages, _loc, _src
        if num_proc is None:
            num_proc = default_num_proc(len(records))
        if not len(records):
            return _empty()
        return records.map(_map_batch, batched=True, batch_size=256, num_proc=num_proc, remove_columns=["messages"],
                           fn_kwargs={"tok": tok, "shape": shape, "limits": limits}, load_from_cache_file=False,
                           writer_batch_size=2000, features=_encoded_features())
    base = Dataset.from_dict({"messages": [[{"role": m["role"], "content": m["content"]} for m in r["messages"]]
                                           for r in records],
                              "_loc": [r.get("_loc") or f"record[{i}]" for i, r in enumerate(records)],
                              "_src": [r.get("_src", 0) for r in records]})
    if num_proc is None:
        num_proc = default_num_proc(len(records))
    if not records:
        return _empty()
    return base.map(_map_batch, batched=True, batch_size=256, num_proc=num_proc, remove_columns=["messages"],
                    fn_kwargs={"tok": tok, "shape": shape, "limits": limits}, load_from_cache_file=False,
                    features=_encoded_features())


def _apply_policy(ds, limits: Limits, on_error: str, stats: EncodeStats, DataError):
    """Errors, over-length policy, conversations without an answer token: counted, dropped
    (column operations: no per-row python objects for the whole set)."""
    import numpy as np
    import pyarrow.compute as pc

    if not len(ds):
        return _empty()
    t = ds.data
    col = lambda n: t.column(n).combine_chunks()  # noqa: E731
    error = col("error")
    bad = np.asarray(pc.not_equal(error, "").to_numpy(zero_copy_only=False), dtype=bool)
    if bad.any():
        first = np.nonzero(bad)[0]
        locs = col("_loc").take(first[:5]).to_pylist()
        msgs = error.take(first[:5]).to_pylist()
        if on_error != "skip":
            raise _located(DataError, locs[0], msgs[0])
        stats.failed += int(bad.sum())
        stats.errors += [f"{l}: {m}" for l, m in zip(locs, msgs)][: 5 - len(stats.errors)]
    flag = lambda n: np.asarray(col(n).to_numpy(zero_copy_only=False), dtype=bool) & ~bad  # noqa: E731
    over = flag("overlength")
    if over.any() and limits.overlength == "error":
        i = int(np.nonzero(over)[0][0])
        raise _located(DataError, col("_loc")[i].as_py(), f"longer than max_length={limits.max_length} tokens "
                                                         f"(overlength=error; set overlength: truncate or drop)", "overlength")
    stats.prompt_cut += int(flag("prompt_cut").sum())
    stats.response_cut += int(flag("response_cut").sum())
    stats.system_folded += int(flag("folded").sum())
    keep = ~bad
    if limits.overlength == "drop":
        stats.overlength_dropped += int(over.sum())
        keep &= ~over
    else:
        stats.truncated += int(over.sum())
    answer = flag("has_answer")
    stats.no_assistant += int((keep & ~answer).sum())
    keep &= answer
    stats.multi_turn += int((keep & (col("answers").to_numpy(zero_copy_only=False) > 1)).sum())
    src = col("_src").to_numpy(zero_copy_only=False)
    ntok = col("n_tokens").to_numpy(zero_copy_only=False)
    for s_ in np.unique(src[~bad]):
        stats.lengths.setdefault(int(s_), []).extend(ntok[(src == s_) & ~bad].tolist())
    idx = np.nonzero(keep)[0]
    stats.kept = len(idx)
    if not len(idx):
        return _empty()
    ds = ds.select(idx) if len(idx) != len(ds) else ds
    return ds.select_columns(["input_ids", "assistant_masks"])


def _empty():
    from datasets import Dataset, Features, Sequence, Value

    return Dataset.from_dict({"input_ids": [], "assistant_masks": []},
                             features=Features({"input_ids": Sequence(Value("int32")),
                                                "assistant_masks": Sequence(Value("int8"))}))


def _located(DataError, loc: str, problem: str, reason: str = "template"):
    path, _, line = str(loc).rpartition(":")
    if not path:
        return DataError(problem, None, loc, "messages", reason=reason)
    return DataError(problem, path, line, "messages", reason=reason)
