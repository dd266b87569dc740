"""English exam items for the RL recipe (recipes/med_rlvr.yaml), from the same knowledge table
as make_samples.py, with another seed, none equal to a bundled MedQA / MedMCQA item (those stay
the recipe's before/after exam sets):

* `mcq_rlvr_en.jsonl` (120, MedQA shape): the grpo stage's prompts (a held-out share of them
  never trained on);
* `sft_rlvr_en.jsonl` (120 items on the OTHER half of the conditions, `messages` shape): the SFT
  stage that teaches the answer format first (never the answer to a question grpo asks) — the user turn is the grpo prompt (medpipe.stages.rewards.answers.user_text),
  the assistant turn `<answer>X</answer>`.

Regenerate (seeded, byte-identical): `python samples/make_rlvr_samples.py` (imports medpipe for
the prompt text, so the SFT prompts equal the grpo ones)."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_samples as ms  # noqa: E402

SEED = 20261207


def item(rng: random.Random, c: dict, q: str, li: int, style: str) -> dict:
    opts, _ = ms.mcq(rng, c, q, "en", 4, li)
    s = c["en_sym"]
    if style == "vignette":
        who = ms.demographic(rng, c, "en")
        vign = (f"A {who} comes to the physician because of {s[0]}, {s[1]} and {s[2]}." if c["dx"]
                else f"A {who} comes to the physician for a routine health check.")
        stem = {"dx": f"{vign} Which of the following is the most likely diagnosis?",
                "test": f"{vign} The physician suspects {c['en']}. Which investigation best confirms the diagnosis?",
                "tx": f"{vign} A diagnosis of {c['en']} is confirmed. Which is the most appropriate first-line management?"}[q]
    else:
        stem = {"dx": f"A patient presents with {s[0]}, {s[1]} and {s[2]}. The most likely diagnosis is:",
                "test": f"The investigation of choice to confirm {c['en']} is:",
                "tx": f"The first-line treatment of {c['en']} is:"}[q]
    options = dict(zip("ABCD", opts))
    return {"question": stem, "answer": opts[li], "options": options, "meta_info": "rlvr", "answer_idx": "ABCD"[li]}


def build() -> tuple[list[dict], list[dict]]:
    rng = random.Random(SEED)
    bundled = {json.loads(l)["question"] for l in (HERE / "mcq_medqa.jsonl").read_text().splitlines()}
    conds = list(ms.CONDS)
    rng.shuffle(conds)
    # the SFT items come from the other half of the conditions: SFT teaches the answer format,
    # never the answer to a question the grpo stage (or its held-out share) asks
    halves = conds[0::2], conds[1::2]
    seen, out = set(), []
    for half in halves:
        plan = [(c, q) for c in half for q in ("tx", "test", "dx") if not (q == "dx" and not c["dx"])]
        letters = ms.balanced_letters(rng, 120, 4)
        rows: list[dict] = []
        while len(rows) < 120:
            c, q = rng.choice(plan)
            it = item(rng, c, q, letters[len(rows)], rng.choice(("vignette", "short")))
            key = (it["question"], tuple(it["options"].values()))
            if it["question"] in bundled or key in seen:
                continue
            seen.add(key)
            rows.append(it)
        out.append(rows)
    return out[0], out[1]


def main() -> None:
    from medpipe.stages.rewards.answers import user_text

    grpo, sft = build()
    (HERE / "mcq_rlvr_en.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in grpo))
    chat = []
    for r in sft:
        rec = {"question": r["question"], "options": r["options"], "context": None}
        chat.append({"messages": [{"role": "user", "content": user_text(rec, "en")},
                                  {"role": "assistant", "content": f"<answer>{r['answer_idx']}</answer>"}]})
    (HERE / "sft_rlvr_en.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chat))


if __name__ == "__main__":
    main()
