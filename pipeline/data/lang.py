"""The one language detector: which template (Chinese or English) a text gets, everywhere —
SFT/CPT rendering of mcq and QA records (render.py), eval and C-Poly prompts
(medpipe.stages.evaluation.prompts), RAG passage headers in chat and serve.

Rule: "zh" when the text has CJK ideographs and they number at least a fifth of its Latin
letters, else "en". One Chinese character carries about as much as a short English word (~5
letters), so this asks "is at least about half of the content Chinese?". An English question with
a Chinese gloss stays English — "Which drug treats hypertension (高血压)?" has 3 CJK characters
against 29 Latin letters → "en" — and a Chinese question quoting an English term stays Chinese
("高血压患者首选哪种ACEI类药物？" → "zh"). Text without CJK is "en" (also empty text).
"""
from __future__ import annotations

import re

# CJK Unified Ideographs (+ extension A) and the compatibility ideographs; kana are not Chinese.
_CJK_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN_RE = re.compile(r"[A-Za-z]")
LANGS = ("en", "zh")


def detect_lang(text: str | None) -> str:
    """'zh' if CJK ideographs are present and >= 1/5 of the Latin letters, else 'en'."""
    cjk = len(_CJK_RE.findall(text or ""))
    latin = len(_LATIN_RE.findall(text or ""))
    return "zh" if cjk > 0 and cjk * 5 >= latin else "en"
