"""The continuous engine alone (no HTTP), SmolLM2-135M-Instruct, variants A/B in one process (issue 29):
`nopack` — the prefill as before (waiting prompts left-padded together, every prompt whole), DynamicCache's
`torch.cat` per decoding step; `pack` — prompts packed without padding, their shared prefix once, the
last prompt's cache reused (stages/inference/packed.py); `pack+slack` — and decoding steps written
into cache room allocated ahead. `C` client threads, each submitting its next of `N` bench prompts
(bench_serve.py's questions through the chat template) when its last is answered; 12 new tokens.
Variants alternate, order flipped every rep; wall and process CPU seconds; `--check` compares every
variant's texts with sequential `LocalModel.generate_ids`.

    nice -n -10 .venv/bin/python bench/bench_serve_engine.py 8 8 2 "nopack,pack,pack+slack" --check
"""
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    import torch
    from transformers.cache_utils import DynamicLayer

    from medpipe import registry
    from medpipe.stages.inference import continuous, packed
    from medpipe.stages.inference.runtime import LocalModel
    from test_serve_limits import questions

    d = registry.model_source("smollm2").materialize({})
    torch.set_num_threads(1)
    m = LocalModel(d, d, name="m")
    C, N, REPS, NEW = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), 12
    variants = sys.argv[4].split(",")
    prompts = [m.encode(m.render([{"role": "user", "content": q}])) for q in questions(N)]
    real_slack = packed.slack_layer_class

    def run(variant: str):
        packed.slack_layer_class = real_slack if "slack" in variant else (lambda: DynamicLayer)
        eng = continuous.ContinuousEngine(m)
        if "nopack" in variant:
            eng.attn = "other"  # the left-padded prefill path (kept for kernels without 4-D masks)
        it, lock, out = iter(range(N)), threading.Lock(), [None] * N

        def client():
            while True:
                with lock:
                    i = next(it, None)
                if i is None:
                    return
                out[i] = eng.submit(prompts[i], NEW).future.result()

        c0, t0 = time.process_time(), time.perf_counter()
        ths = [threading.Thread(target=client) for _ in range(C)]
        [t.start() for t in ths]
        [t.join() for t in ths]
        r = (time.perf_counter() - t0, time.process_time() - c0, [o.text for o in out])
        eng.close()
        return r

    res: dict = {v: [] for v in variants}
    for rep in range(REPS):
        for v in (variants if rep % 2 == 0 else variants[::-1]):
            res[v].append(run(v))
            print(v, "wall %.1f s, cpu %.1f s" % res[v][-1][:2], flush=True)
    if "--check" in sys.argv:
        want = [g.text for g in m.generate_ids(prompts, max_new_tokens=NEW, batch_size=1)]
        for v in variants:
            print(v, "same texts", sum(a == b for a, b in zip(res[v][0][2], want)), "/", N)
    for v in variants:
        med = lambda k: sorted(x[k] for x in res[v])[len(res[v]) // 2]  # noqa: E731
        print(v, "median wall %.1f s, cpu %.1f s" % (med(0), med(1)))


if __name__ == "__main__":
    main()
