"""Labelled single answers for the `kto` stage (samples/kto_feedback_en.jsonl), in TRL's unpaired
preference shape as feedback comes (MedicalGPT / Zhongjing style: a doctor marks one answer good or
bad, no pair): {"prompt": [user turn], "completion": [assistant turn], "label": true|false}.

From the English preference pairs (preference_en.jsonl), the first 48: every third pair gives both
of its answers (a good and a bad record on one prompt), the others only one (the chosen answer
labelled true, or the rejected one labelled false, alternately) — unpaired and unbalanced as real
feedback is. Regenerate (byte-identical): `python samples/make_kto_samples.py`."""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
N = 48


def rows(pairs: list[dict]) -> list[dict]:
    out = []
    for i, p in enumerate(pairs[:N]):
        prompt = [{"role": "user", "content": p["question"]}]
        good = {"prompt": prompt, "completion": [{"role": "assistant", "content": p["response_chosen"]}], "label": True}
        bad = {"prompt": prompt, "completion": [{"role": "assistant", "content": p["response_rejected"]}], "label": False}
        out += [good, bad] if i % 3 == 0 else [good] if i % 3 == 1 else [bad]
    return out


def main() -> None:
    pairs = [json.loads(line) for line in (HERE / "preference_en.jsonl").read_text(encoding="utf-8").splitlines()]
    with open(HERE / "kto_feedback_en.jsonl", "w", encoding="utf-8") as f:
        for r in rows(pairs):
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
