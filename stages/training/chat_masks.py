"""One conversation → token ids and an assistant-only loss mask, for every chat template.

Masks come from ONE rendering of each conversation: the rendered text is tokenised once with
offsets, each message's content is located in it (in order, never inside a special token,
anchored on the text the template puts before an assistant answer), and a token is trained iff
its characters overlap an assistant span = the answer's content plus the template's end of turn
(the ``</s>``/``<|im_end|>\\n`` it prints after an answer). This gives the same masks as
rendering prefix by prefix on templates that render that way (tests/test_sft_encoding), and
also works for those that do not (Mistral v0.3 moves the system prompt into the last user turn,
Baichuan prints ``</s>`` only after the final answer). A template that drops the system prompt
or refuses a system role (Mistral v0.3 with a final assistant turn, Gemma) gets it folded into
the first user turn, which is what those models' cards recommend; this is counted.

Kept apart from chat_data.py (the dataset: reading, caching, the over-length policy) because
this is the part each new template tests, and it needs nothing but a tokenizer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>")

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
