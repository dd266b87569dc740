"""Each recipe's `reference:` block holds its paper's numbers: every entry parses, names a table
(or figure) whose caption is in the paper's text, and its value is printed there — on the row's
line of that table, or inside the entry's `quote`. The paper texts are ../shared/papers/ beside
the repository (CI: shared/ next to the clone); without them the checks are skipped, saying why."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import medpipe
from medpipe.compose import bundled_recipes, compose, package_dir

REPO = Path(__file__).resolve().parents[1]
# ../shared/papers beside the repository (a git worktree under <workspace>/wt/ looks one level higher)
PAPERS = next((p for p in (REPO.parent / "shared" / "papers", REPO.parent.parent / "shared" / "papers") if p.is_dir()),
              REPO.parent / "shared" / "papers")
NUMBER = re.compile(r"\d+(?:\.\d+)?")


def paper_text(recipe: str) -> str:
    """The paper a recipe names in its header (`paper: ../shared/papers/NNN`)."""
    header = (package_dir("recipes") / f"{recipe}.yaml").read_text(encoding="utf-8")
    m = re.search(r"paper: \.\./shared/papers/(\d{3})", header)
    assert m, f"recipes/{recipe}.yaml names no paper in its header"
    if not PAPERS.is_dir():
        pytest.skip(f"the paper texts are not here ({PAPERS} is absent)")
    files = sorted(PAPERS.glob(f"{m.group(1)}_*.txt"))
    assert files, f"no paper text {m.group(1)}_*.txt in {PAPERS}"
    return files[0].read_text(encoding="utf-8")


def references(recipe: str) -> list[dict]:
    from omegaconf import OmegaConf

    cfg, _ = compose(recipe)  # check_reference runs here: a malformed entry fails compose
    return OmegaConf.to_container(cfg.reference, resolve=True)


def printed(value: float, text: str) -> bool:
    return any(abs(float(n) - value) < 1e-9 for n in NUMBER.findall(text))


def row_lines(text: str, row: str) -> list[str]:
    """The table lines of `row`: lines starting with it (then a tab or a space-parenthesis);
    "MODEL → variant" is the variant line right after MODEL's line ("→ w/o DA" under MEDCARE-7B)."""
    lines = text.splitlines()
    head, _, variant = row.partition(" → ")
    starts = [i for i, line in enumerate(lines) if line.startswith(head + "\t") or line.startswith(head + " (")]
    if not variant:
        return [lines[i] for i in starts]
    return [lines[i + 1] for i in starts if i + 1 < len(lines) and lines[i + 1].lstrip("→↳ ").startswith(variant)]


@pytest.mark.parametrize("recipe", bundled_recipes())
def test_every_reference_is_in_its_paper(recipe):
    refs = references(recipe)
    if not refs and "paper: ../shared/papers/" not in (package_dir("recipes") / f"{recipe}.yaml").read_text():
        pytest.skip(f"{recipe} carries no reference values (its papers are not among ../shared/papers)")
    text = paper_text(recipe)
    for ref in refs:
        where = f"{recipe}: {ref['table']} / {ref['row']} / {ref['column']} = {ref['value']}"
        caption = re.compile(rf"^(?:#+\s*)?{re.escape(ref['table'])}[:.]", re.M)
        assert caption.search(text), f"{where}: no '{ref['table']}' caption in the paper"
        if ref.get("quote"):
            assert ref["quote"] in text, f"{where}: the quote is not in the paper"
            assert printed(ref["value"], ref["quote"]), f"{where}: the quote does not print the value"
        else:
            lines = row_lines(text, ref["row"])
            assert lines, f"{where}: no table line for row '{ref['row']}'"
            assert any(printed(ref["value"], line) for line in lines), f"{where}: not on the row's line(s) {lines}"


def test_the_papers_key_numbers_are_there():
    """The issue's examples, one per table kind."""
    refs = {(r["table"], r["row"], r["column"]): r for r in references("medcare")}
    assert refs[("Table 1", "Qwen1.5-7B", "MedQA")]["value"] == 74.46
    assert refs[("Table 1", "MEDCARE-7B", "MedQA")]["value"] == 76.77
    assert refs[("Table 1", "MEDCARE-7B → w/o DA", "MedQA")]["value"] == 75.16
    assert refs[("Table 1", "MEDCARE-7B → w/o DA", "MedQA")]["stage"] == "mka"
    qilin = {(r["table"], r["stage"], r["column"]): r for r in references("qilin")}
    assert [qilin[("Table 5", s, "Accuracy")]["value"] for s in ("base", "cpt", "sft")] == [33.5, 38.4, 40.0]
    assert [qilin[("Table 6", s, "BLEU-1")]["value"] for s in ("sft", "dpo")] == [12.69, 16.66]
    assert qilin[("Table 5", "base", "Accuracy")]["metric"] == "cmexam/acc"
    assert references("iimedgpt") == []  # its results are charts: the text prints no numbers


def test_a_malformed_reference_is_one_line_naming_the_entry():
    r = medpipe("show", "recipe=qilin", "reference.2.value=high")
    assert r.code == 2 and "reference[2].value: a number as the paper prints it, got 'high'" in r.out
    r = medpipe("show", "recipe=qilin", "+reference.0.page=3")
    assert r.code == 2 and "reference[0].page: unknown key" in r.out
    r = medpipe("show", "recipe=qilin", "~reference.3.row")
    assert r.code == 2 and "reference[3].row: required" in r.out
