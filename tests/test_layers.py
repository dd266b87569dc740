"""The layering, enforced: imports go one way, the engine never imports stage code, no loops.

Layers, lowest first (a module may import its own layer and those below, never above):
  0 base       medpipe, medpipe.errors, medpipe.paths, medpipe.params
  1 data       medpipe.data.*            (torch-free records, validation, mixing, dedup)
  2 engine     medpipe.stagekind, artifact, compose, registry, plan, run, store, entry, launch, sweep, ...
  3 libraries  medpipe.stages.{models < adapters < training < inference < evaluation < rewards}
  4 kinds      medpipe.stages.<kind>     (one module per stage kind; kinds never import kinds)
  5 commands   medpipe.commands.*        (cli, show, report, serve, chat, eval, run-dir helpers)
Every import counts, also those inside functions (they are how heavy imports stay lazy).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"medpipe": ROOT / "pipeline", "medpipe.stages": ROOT / "stages"}
LIBRARIES = ("models", "adapters", "training", "inference", "evaluation", "rewards")
BASE = {"medpipe", "medpipe.errors", "medpipe.paths", "medpipe.params"}


def modules() -> dict[str, Path]:
    found = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if pkg == "medpipe" and name.startswith("medpipe.stages"):
                continue
            found[name] = path
    return found


def layer(name: str) -> tuple[int, int]:
    """(layer, rank within it) of a module."""
    if name in BASE:
        return 0, 0
    if name == "medpipe.data" or name.startswith("medpipe.data."):
        return 1, 0
    if name.startswith("medpipe.commands"):
        return 5, 0
    if name.startswith("medpipe.stages."):
        sub = name.split(".")[2]
        if sub in LIBRARIES:
            return 3, LIBRARIES.index(sub)
        return 4, 0
    if name == "medpipe.stages":
        return 3, 0
    return 2, 0  # medpipe.<engine module>


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """The medpipe modules `name` imports (resolved to modules that exist), with line numbers."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            if not t.startswith("medpipe"):
                continue
            # the longest prefix that is a module (`from medpipe.data import X` → medpipe.data)
            parts = t.split(".")
            while parts and ".".join(parts) not in known:
                parts.pop()
            if parts:
                out.append((".".join(parts), node.lineno))
    return sorted({(m, ln) for m, ln in out if m != name}, key=lambda t: (t[1], t[0]))


def graph() -> dict[str, list[tuple[str, int]]]:
    mods = modules()
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items()}


def test_every_import_goes_down_or_sideways():
    bad = []
    for name, deps in graph().items():
        for dep, line in deps:
            if dep in ("medpipe",):  # the package root (its version) is base
                continue
            (la, ra), (lb, rb) = layer(name), layer(dep)
            if lb > la or (lb == la == 3 and rb > ra):
                bad.append(f"{name}:{line} imports {dep} (layer {lb}.{rb} above {la}.{ra})")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_engine_imports_no_stage_code():
    bad = [f"{name}:{line} imports {dep}" for name, deps in graph().items() if layer(name)[0] <= 2
           for dep, line in deps if dep.startswith("medpipe.stages") or dep.startswith("medpipe.commands")]
    assert not bad, "\n".join(bad)


def test_stage_kinds_do_not_import_each_other():
    g = graph()
    bad = [f"{name}:{line} imports {dep}" for name, deps in g.items() if layer(name)[0] == 4
           for dep, line in deps if layer(dep)[0] == 4 and dep != name]
    assert not bad, "a kind's shared code belongs in a library sub-package:\n" + "\n".join(bad)


def loops(g: dict[str, set[str]]) -> list[str]:
    """Every import loop of a module graph, as "a → b → a".

    A module depends on its parent packages implicitly (Python imports a package before any of its
    submodules), so an edge from a module to its own ancestor package says nothing and is dropped.
    A package's `__init__` importing a submodule is an edge like any other: a loop through it runs
    when the package is imported (protocols/__init__ → protocols.cmexam → runner → protocols)."""
    g = {n: {d for d in ds if d != "medpipe" and not n.startswith(d + ".")} for n, ds in g.items()}
    state: dict[str, int] = {}
    found = []

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for d in sorted(g.get(n, ())):
            if state.get(d) == 1:
                found.append(" → ".join(stack[stack.index(d):] + [d]) if d in stack else f"{n} → {d}")
            elif d not in state:
                visit(d, stack + [d])
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n, [n])
    return found


def test_no_import_loops():
    found = loops({name: {d for d, _ in deps} for name, deps in graph().items()})
    assert not found, "import loops:\n" + "\n".join(found)


def test_the_loop_check_sees_a_loop_through_a_package_init(tmp_path):
    """The loop evaluation/runner.py had: the runner imports the protocols package, whose __init__
    imports a protocol module, which imports the runner back (imports inside functions count)."""
    files = {"medpipe.ev.runner": "def f():\n    from .protocols import run\n",
             "medpipe.ev.protocols": "from . import cm\n",
             "medpipe.ev.protocols.cm": "def g():\n    from ..runner import prompt_hash\n    from . import x\n",
             "medpipe.ev.protocols.x": "from medpipe.ev.protocols import cm\n"}
    known = set(files)
    g = {}
    for name, text in files.items():
        path = tmp_path / (name + ("/__init__.py" if name.endswith("protocols") else ".py"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        g[name] = {d for d, _ in imports(name, path, known)}
    assert sorted(loops(g)) == [
        "medpipe.ev.protocols → medpipe.ev.protocols.cm → medpipe.ev.runner → medpipe.ev.protocols",
        "medpipe.ev.protocols.cm → medpipe.ev.protocols.x → medpipe.ev.protocols.cm"]


def test_the_checker_sees_a_violation(tmp_path):
    """The test can fail: an engine module importing a stage kind is reported."""
    fake = tmp_path / "run.py"
    fake.write_text("def f():\n    from medpipe.stages.sft import SFTStage\n")
    deps = imports("medpipe.run", fake, {"medpipe.run", "medpipe.stages.sft"})
    assert deps == [("medpipe.stages.sft", 2)]
    assert layer("medpipe.stages.sft")[0] > layer("medpipe.run")[0]
