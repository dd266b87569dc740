"""PromptCBLUE's Text2DT task (clinical decision trees from guideline text), scored as the
benchmark scores it: the tree edit ratio ("TreeLenvRatio", 1 − edit distance / largest possible).

An answer lists the tree's nodes in preorder, one per line:
    <label>：role=C；logical_rel=and；triples=[('患者', '临床表现', '发热'), ...]
`C` is a condition node with two subtrees (condition met, not met), `D` a decision leaf.

Distance between two nodes: 1 if the roles differ, 1 if the logical relations differ, plus the
size of the symmetric difference of their triple sets (triples lowercased). Between two trees,
walked together from the root: matching internal nodes add their node distance and recurse into
left and right; a leaf facing a subtree adds its node distance plus every node of that subtree
against an empty node. The largest distance of a pair is (unique triples + 2 × nodes that have
triples), summed over predicted and gold tree. Scores over a set are summed before dividing.

Trees are rebuilt from the preorder roles; a condition node without two complete subtrees is a
leaf, and so is every ancestor of it (the benchmark's own rebuild behaves so for such input).
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Optional

EMPTY = {"role": "", "logical_rel": "null", "triples": frozenset()}


def parse_text2dt(text: str) -> list[dict]:
    """Nodes {role, logical_rel, triples: frozenset of 3-tuples} from an answer; lines without a
    `role=` are skipped; no node at all gives the benchmark's default, one empty decision node."""
    nodes = []
    for line in (text or "").split("\n"):
        if "role=" not in line:
            continue
        role = line.split("role=", 1)[1].split("；logical_rel=")[0].split("；triples=")[0].strip()
        rel = line.split("；logical_rel=", 1)[1].split("；triples=")[0].strip() if "；logical_rel=" in line else "null"
        triples: set = set()
        if "；triples=" in line:
            try:
                value = ast.literal_eval(line.split("；triples=", 1)[1].strip())
            except (ValueError, SyntaxError):
                value = []
            for t in value if isinstance(value, (list, tuple)) else []:
                if isinstance(t, (list, tuple)) and len(t) == 3:
                    triples.add(tuple(str(x).lower() for x in t))
        nodes.append({"role": role, "logical_rel": rel, "triples": frozenset(triples)})
    return nodes or [{"role": "D", "logical_rel": "null", "triples": frozenset()}]


@dataclass
class _Tree:
    node: dict
    children: list["_Tree"] = field(default_factory=list)  # [] (leaf) or [left, right]


def build_tree(nodes: list[dict]) -> _Tree:
    """The tree of a preorder node list (see the module doc for incomplete condition nodes)."""

    def parse(i: int) -> tuple[_Tree, int, bool]:  # (subtree, next index, complete?)
        t = _Tree(nodes[i])
        if nodes[i]["role"] != "C":
            return t, i + 1, True
        kids, j, ok = [], i + 1, True
        for _ in range(2):
            if j >= len(nodes):
                return t, j, False
            sub, j, sub_ok = parse(j)
            kids.append(sub)
            ok = ok and sub_ok
        if ok:
            t.children = kids
        return t, j, ok

    return parse(0)[0]


def node_distance(a: dict, b: Optional[dict]) -> int:
    b = b or EMPTY
    return int(a["role"] != b["role"]) + int(a["logical_rel"] != b["logical_rel"]) + len(a["triples"] ^ b["triples"])


def _against_empty(t: _Tree) -> int:
    return sum(node_distance(c.node, None) + _against_empty(c) for c in t.children)


def edit_distance(p: _Tree, g: _Tree) -> int:
    d = node_distance(p.node, g.node)
    if p.children and g.children:
        return d + edit_distance(p.children[0], g.children[0]) + edit_distance(p.children[1], g.children[1])
    return d + _against_empty(p) + _against_empty(g)  # at most one of them has a subtree


def max_distance(nodes: list[dict]) -> int:
    with_triples = [n for n in nodes if n["triples"]]
    return len(set().union(*(n["triples"] for n in nodes))) + 2 * len(with_triples)


def tree_edit_ratio(golds: list[list[dict]], preds: list[list[dict]]) -> float:
    """1 − Σ edit distance / Σ largest distance over the pairs (0 when nothing can differ)."""
    dist = sum(edit_distance(build_tree(p), build_tree(g)) for g, p in zip(golds, preds))
    most = sum(max_distance(p) + max_distance(g) for g, p in zip(golds, preds))
    return 1.0 - dist / most if most else 0.0
