"""Held-out figures an eval stage can take on any model, random or trained, so a short run shows
what each training stage changed (the tiny profiles use them; the papers' recipes do not):

* `text`: perplexity of held-out documents (exp of the mean next-token NLL over every token,
  in windows of `block_size`) — falls with continued pretraining;
* `chat`: mean NLL of the last assistant turn given the conversation before it (the chat template
  when the tokenizer has one) — the SFT objective on conversations never trained on;
* `preference`: the share of pairs whose chosen answer has the higher summed log-probability than
  the rejected one, and the mean margin (log p(chosen) − log p(rejected), nats) — what DPO moves.

The records are the held-out split (`fraction`, the data seed) of the very spec the training stage
read (`heldout: {text: ${stages.cpt.data}, fraction: 0.1}` with the stage's `heldout: 0.1`):
load_records splits a spec the same way every time, so none of them was trained on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from medpipe.params import Checked, param


@dataclass
class HeldoutParams(Checked):
    """Held-out perplexity / chat loss / preference accuracy (null specs = off)."""

    _where: ClassVar[str] = "heldout."
    text: Any = param(None, "documents: perplexity of the held-out split (the CPT stage's data spec)")
    chat: Any = param(None, "conversations: NLL of the last answer on the held-out split (the SFT stage's data)")
    preference: Any = param(None, "pairs: log p(chosen) > log p(rejected) on the held-out split (the DPO stage's data)")
    fraction: float = param(0.1, "held-out fraction for sources that set none (= the training stage's `heldout`)")
    limit: Optional[int] = param(None, "first N held-out records of each kind")
    block_size: int = param(128, "text: tokens per scored window")

    def _rules(self):
        return [("fraction", 0 < self.fraction < 1, "in (0, 1)"), ("block_size", self.block_size >= 2, ">= 2"),
                ("limit", self.limit is None or self.limit >= 1, ">= 1 or null")]

    def active(self) -> bool:
        return any(v is not None for v in (self.text, self.chat, self.preference))


def heldout_records(spec: Any, want: str, hp: HeldoutParams, data_opts: dict) -> list[dict]:
    from medpipe.data import load_records

    opts = {"seed": int(data_opts.get("seed") or 0), "on_error": data_opts.get("on_error") or "fail"}
    held = load_records(spec, want, heldout=hp.fraction, **opts).heldout
    return held[: hp.limit] if hp.limit else held


def _render(tok: Any, messages: list[dict]) -> str:
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def _answer_logprob(model: Any, tok: Any, prompt: str, answer: str) -> tuple[float, int]:
    """Summed log p(answer tokens | prompt) and the answer's token count."""
    import torch

    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tok(answer, add_special_tokens=False)["input_ids"]
    if tok.eos_token_id is not None:
        a_ids = a_ids + [tok.eos_token_id]
    ids = torch.tensor([p_ids + a_ids])
    logits = model(ids).logits[0, len(p_ids) - 1:-1].float()
    lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(a_ids)[:, None]).sum().item()
    return lp, len(a_ids)


def measure(model_path: str, hp: HeldoutParams, data_opts: dict, say=print) -> dict[str, dict]:
    """{set name: result} for each configured kind; result = {kind, n, metrics}."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    out: dict[str, dict] = {}
    with torch.inference_mode():
        if hp.text is not None:
            docs = heldout_records(hp.text, "text", hp, data_opts)
            nll, n_tok = 0.0, 0
            for d in docs:
                ids = tok(d["text"], add_special_tokens=False)["input_ids"]
                for start in range(0, len(ids) - 1, hp.block_size):
                    window = torch.tensor([ids[start:start + hp.block_size + 1]])
                    if window.shape[1] < 2:
                        continue
                    loss = model(window, labels=window).loss.item()
                    nll += loss * (window.shape[1] - 1)
                    n_tok += window.shape[1] - 1
            ppl = math.exp(nll / n_tok) if n_tok else float("nan")
            out["heldout_text"] = {"kind": "heldout", "n": len(docs), "metrics": {"ppl": ppl, "tokens": n_tok}}
            say(f"heldout_text: perplexity {ppl:.4g} over {n_tok} tokens of {len(docs)} held-out documents")
        if hp.chat is not None:
            convs = heldout_records(hp.chat, "chat", hp, data_opts)
            total, count = 0.0, 0
            for c in convs:
                msgs = [{"role": m["role"], "content": m["content"]} for m in c["messages"]]
                lp, k = _answer_logprob(model, tok, _render(tok, msgs[:-1]), msgs[-1]["content"])
                total, count = total - lp, count + k
            loss = total / count if count else float("nan")
            out["heldout_chat"] = {"kind": "heldout", "n": len(convs), "metrics": {"loss": loss}}
            say(f"heldout_chat: answer loss {loss:.4g} (mean NLL per token) on {len(convs)} held-out conversations")
        if hp.preference is not None:
            pairs = heldout_records(hp.preference, "preference", hp, data_opts)
            wins, margins = 0, []
            for r in pairs:
                prompt = _render(tok, r["prompt"])
                margin = _answer_logprob(model, tok, prompt, r["chosen"])[0] - \
                    _answer_logprob(model, tok, prompt, r["rejected"])[0]
                margins.append(margin)
                wins += margin > 0
            acc = wins / len(pairs) if pairs else float("nan")
            margin = sum(margins) / len(margins) if margins else float("nan")
            out["heldout_pref"] = {"kind": "heldout", "n": len(pairs), "metrics": {"acc": acc, "margin": margin}}
            say(f"heldout_pref: chosen preferred on {wins}/{len(pairs)} held-out pairs (acc {acc:.3f}), "
                f"mean margin {margin:.4g} nats")
    return out
