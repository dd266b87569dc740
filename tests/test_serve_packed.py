"""The continuous loop's prefill (stages/inference/packed.py): the prompts waiting are packed into one
row without padding, their common prefix computed once, and a later prompt's prefix in common with the
last one prefilled taken from its cache; answers stay those of sequential generation."""
from __future__ import annotations

import pytest

from medpipe.stages.inference.continuous import ContinuousEngine
from medpipe.stages.inference.packed import common_prefix
from test_serve_limits import questions, varied_tiny


@pytest.fixture(scope="module")
def model():
    return varied_tiny()


def test_prompts_are_prefilled_packed_with_their_shared_prefix_once_then_cached(model):
    engine = ContinuousEngine(model)
    shapes = []
    forward = engine._forward

    def counting(all_logits=False, **kw):
        shapes.append(tuple(kw["input_ids"].shape))
        return forward(all_logits, **kw)

    engine._forward = counting
    head = model.encode("You are a careful medical assistant. 头痛发热咳嗽胸闷")
    prompts = [head + model.encode(q) for q in questions(4)[1:]]
    later = head + model.encode(questions(6)[5])
    assert len({len(p) for p in prompts}) == len(prompts) and len(head) >= 8
    want = [c.text for c in model.generate_ids(prompts + [later], max_new_tokens=10, batch_size=1)]
    try:
        with engine.wake:  # all three in the inbox before the loop looks: one prefill group
            reqs = [engine.submit(p, 10) for p in prompts]
        got = [r.future.result(timeout=60).text for r in reqs]
        shared = common_prefix(prompts)
        # one row: the shared prefix once, then each prompt's own tokens; no padding
        assert shapes[0] == (1, shared + sum(len(p) - shared for p in prompts))
        assert all(s == (len(prompts), 1) or s[0] < len(prompts) for s in shapes[1:])  # then decoding steps
        shapes.clear()
        got.append(engine.submit(later, 10).future.result(timeout=60).text)
        # the last prompt prefilled (the shortest of the group) stays cached: only the rest is computed
        cached = common_prefix([min(prompts, key=len), later])
        assert cached >= len(head) and shapes[0] == (1, len(later) - cached)
    finally:
        engine.close()
    assert got == want
