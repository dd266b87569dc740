"""`medpipe serve` under load on 127.0.0.1 (issue 18): requests/s and p50/p95 latency at
concurrency 1/8/32 in three servers measured side by side in one run: one request at a time
(static batching, `max_batch` 1: what the old one-lock server did), micro-batched (static,
`max_batch` 32: the batch generated to its end before the next one starts) and continuous batching
(`max_batch` 32: requests join the running batch at the next step); and the stall test (a 1 MB
prompt answered 400/413 in < 1 s while a concurrent small request is still answered).

Model: the tiny model with its weights redrawn (seeded, std 0.3) so greedy answers differ per
prompt; every answer of every mode is compared with sequential `LocalModel.generate` (same text).
Greedy, `--new` tokens at most. The server runs in its own process (as `medpipe serve` does: an
in-process server shares the GIL with the clients, which then cap it); the clients are asyncio
tasks, each sending its next request as soon as the last is answered, on keep-alive connections
(`--client raw`, the default: a few lines of asyncio streams, as light as wrk; `--client httpx`: httpx's
AsyncClient, whose ≈ 2 ms of CPU a request is taken from the server on a 2-core machine). The server's
CPU time per request (/proc) is printed beside each row.

    /work/main/.venv/bin/python bench/bench_serve.py [--requests 64 --new 16 --threads 1 --client raw]

Issue 29's columns: `--logprobs` adds the continuous server answering with `logprobs: true,
top_logprobs: 5` (their cost), `--peer` adds transformers 5.23's own OpenAI server
(`transformers serve --continuous-batching`, same model dir, same requests, its texts compared too);
`--model smollm2` (SmolLM2-135M-Instruct, converted once) or a model dir instead of the tiny one;
`--modes` picks the medpipe servers (e.g. "one at a time,continuous").
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def load(url: str, prompts: list[str], concurrency: int, new: int, client: str = "raw",
         extra: dict | None = None) -> tuple[float, list[float], list[str]]:
    """`concurrency` clients, each sending its next request as soon as the last is answered; (wall s,
    latency per request, answer texts). client "raw": keep-alive HTTP/1.1 on asyncio streams (≈ 0.2 ms
    of CPU a request, as wrk-like load generators are); "httpx": one httpx.AsyncClient (≈ 2 ms a
    request, which on a 2-core machine is taken from the server's second core)."""
    import asyncio

    latencies: list[float] = [0.0] * len(prompts)
    texts: list[str] = [""] * len(prompts)
    next_i = iter(range(len(prompts)))
    body = lambda i: {"messages": [{"role": "user", "content": prompts[i]}], "max_tokens": new,  # noqa: E731
                      **(extra or {})}

    async def raw_client(host: str, port: int):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for i in next_i:
                data = json.dumps(body(i), ensure_ascii=False).encode()
                t0 = time.monotonic()
                writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(data), data))
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                length = next(int(h.split(":", 1)[1]) for h in head if h.lower().startswith("content-length:"))
                answer = await reader.readexactly(length)
                latencies[i] = time.monotonic() - t0
                if head[0].split()[1] != "200":
                    raise RuntimeError(f"{head[0]}: {answer[:200]!r}")
                texts[i] = json.loads(answer)["choices"][0]["message"]["content"]
        finally:
            writer.close()

    async def httpx_client(http):
        for i in next_i:
            t0 = time.monotonic()
            r = await http.post(f"{url}/v1/chat/completions", json=body(i))
            latencies[i] = time.monotonic() - t0
            r.raise_for_status()
            texts[i] = r.json()["choices"][0]["message"]["content"]

    async def run():
        if client == "raw":
            host, port = url.split("//", 1)[1].rsplit(":", 1)
            await asyncio.gather(*(raw_client(host, int(port)) for _ in range(concurrency)))
            return
        import httpx

        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=300, limits=limits) as http:
            await asyncio.gather(*(httpx_client(http) for _ in range(concurrency)))

    t0 = time.monotonic()
    asyncio.run(run())
    return time.monotonic() - t0, latencies, texts


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def stall_test(url: str) -> dict:
    import httpx

    small: dict = {}

    def ask_small():
        t0 = time.monotonic()
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "偏头痛如何治疗？"}], "max_tokens": 8})
        small.update(status=r.status_code, seconds=time.monotonic() - t0)

    out = {}
    for name, content in (("1MB ascii (body under the 2 MiB limit)", "a" * 1_000_000),
                          ("1M CJK chars (3 MB body)", "头痛" * 500_000)):
        t = threading.Thread(target=ask_small)
        t.start()
        t0 = time.monotonic()
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={"messages": [{"role": "user", "content": content}]})
        took = time.monotonic() - t0
        t.join()
        out[name] = {"status": r.status_code, "seconds": round(took, 3), "small_status": small["status"],
                     "small_seconds": round(small["seconds"], 3)}
    return out


# (mode, server: medpipe batching and max_batch, or "peer": transformers serve, what each request adds)
MODES = (("one at a time", ("static", 1), {}), ("micro-batched", ("static", 32), {}),
         ("continuous", ("continuous", 32), {}))
LOGPROBS = ("continuous + logprobs", ("continuous", 32), {"logprobs": True, "top_logprobs": 5})
PEER = ("transformers serve", "peer", {"temperature": 0})


def serve_only(port: int, batching: str, max_batch: int, threads: int, model_dir: str) -> None:
    """The server process: the model dir behind build_app, until killed."""
    import torch

    from medpipe.commands.serve import Limits, build_app, make_server
    from medpipe.stages.inference.runtime import LocalModel

    torch.set_num_threads(threads)
    model = LocalModel(model_dir, model_dir, name="m")
    app = build_app(model, "m", limits=Limits(max_batch=max_batch, batching=batching))
    print(json.dumps({"server": port, "batching": app.state.batching, "max_batch": max_batch}), flush=True)
    make_server(app, "127.0.0.1", port, log_level="warning").run()


def kv_bytes(model_dir: str) -> int:
    """fp32 KV-cache bytes per token of the model in this dir."""
    from transformers import AutoConfig

    from medpipe.stages.inference.continuous import kv_bytes_per_token

    return kv_bytes_per_token(AutoConfig.from_pretrained(model_dir), 4)


def start_server(server: tuple | str, threads: int, model_dir: str):
    """`medpipe serve`'s app in its own process, or ("peer") transformers 5.23's own OpenAI server
    (`transformers serve --continuous-batching`) on the same model dir, with as many torch threads."""
    import subprocess

    import httpx

    from medpipe.commands.serve import free_port

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    if server == "peer":
        # its paged KV cache bounded as medpipe's (1 GiB default): sized by itself it took 12 GB on
        # SmolLM2 and was killed for memory on this 23 GB machine
        blocks = max(64, (1 << 30) // (32 * kv_bytes(model_dir)))
        cmd = [str(Path(sys.executable).with_name("transformers")), "serve", "--continuous-batching", "--device", "cpu",
               "--dtype", "float32", "--cb-block-size", "32", "--cb-num-blocks", str(blocks),
               "--host", "127.0.0.1", "--port", str(port), model_dir]
    else:
        batching, max_batch = server
        cmd = [sys.executable, __file__, "--serve-only", str(port), "--batching", batching, "--max-batch", str(max_batch),
               "--threads", str(threads), "--model-dir", model_dir]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steady figures on a shared machine)")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--client", default="raw", choices=("raw", "httpx"), help="the load generator (see load())")
    ap.add_argument("--serve-only", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--max-batch", type=int, default=32, help=argparse.SUPPRESS)
    ap.add_argument("--batching", default="continuous", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="tiny", help="tiny (redrawn weights), smollm2 (SmolLM2-135M-Instruct) or a model dir")
    ap.add_argument("--modes", default="one at a time,micro-batched,continuous", help="which of the medpipe servers")
    ap.add_argument("--logprobs", action="store_true", help="also the continuous server with logprobs + top_logprobs 5")
    ap.add_argument("--peer", action="store_true", help="also transformers serve --continuous-batching")
    ap.add_argument("--stall", action="store_true", help="also the 1 MB prompt stall test")
    args = ap.parse_args()
    if args.serve_only:
        return serve_only(args.serve_only, args.batching, args.max_batch, args.threads, args.model_dir)
    import tempfile

    import torch

    from medpipe.stages.inference.runtime import LocalModel
    from test_serve_limits import questions, varied_tiny

    torch.set_num_threads(args.threads)
    if args.model == "tiny":  # saved once, so every server (and the peer) loads the same weights
        model = varied_tiny()
        model_dir = tempfile.mkdtemp(prefix="bench-serve-")
        model.model.save_pretrained(model_dir)
        model.tok.save_pretrained(model_dir)
    else:
        model_dir = args.model
        if args.model == "smollm2":
            from medpipe import registry

            model_dir = registry.model_source("smollm2").materialize({})
        model = LocalModel(model_dir, model_dir, name="m")
    modes = [m for m in MODES if m[0] in args.modes.split(",")] + ([LOGPROBS] if args.logprobs else []) \
        + ([PEER] if args.peer else [])
    prompts = questions(args.requests)
    want = [model.chat([{"role": "user", "content": q}], max_new_tokens=args.new).text for q in prompts]
    # the ceiling batching can reach here: 8 prompts as one generate vs one by one, no HTTP (tiny only:
    # on a real model it costs minutes)
    rendered = [model.render([{"role": "user", "content": q}]) for q in prompts[:8]]
    if args.model == "tiny":
        t0 = time.monotonic()
        for p in rendered:
            model.generate([p], max_new_tokens=args.new)
        one = time.monotonic() - t0
        t0 = time.monotonic()
        model.generate(rendered, max_new_tokens=args.new, batch_size=8)
        print(json.dumps({"model_only_8_prompts": {"one_by_one_s": round(one, 3),
                                                   "one_batch_s": round(time.monotonic() - t0, 3)}}), flush=True)
    del model
    rows = []
    procs = {}
    for _, server, _ in modes:  # one process per server (the logprobs mode shares continuous's)
        if server not in procs:
            procs[server] = start_server(server, args.threads, model_dir)
    servers = {mode: procs[server] for mode, server, _ in modes}
    extra = {mode: ({**add, "model": model_dir} if server == "peer" else add) for mode, server, add in modes}
    try:
        for mode, (_, url) in servers.items():
            load(url, prompts[:4], 2, args.new, args.client, extra[mode])  # warm-up
        for c in [int(x) for x in args.concurrency.split(",")]:
            n = len(prompts) if c > 1 else max(8, len(prompts) // 4)
            runs: dict[str, list] = {mode: [] for mode in servers}
            cpu: dict[str, float] = {mode: 0.0 for mode in servers}
            for r in range(args.reps):  # modes alternate, order flipped every rep: load drifts hit all
                for mode in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
                    proc, url = servers[mode]
                    before = cpu_seconds(proc.pid)
                    runs[mode].append(load(url, prompts[:n], c, args.new, args.client, extra[mode]))
                    cpu[mode] += cpu_seconds(proc.pid) - before
            for mode, got in runs.items():
                wall = statistics.median(g[0] for g in got)
                lat = [x for g in got for x in g[1]]
                rows.append({"mode": mode, "concurrency": c, "requests": n, "reps": args.reps,
                             "req_per_s": round(n / wall, 2), "p50_s": round(statistics.median(lat), 3),
                             "p95_s": round(pct(lat, 0.95), 3), "server_cpu_ms_per_req": round(cpu[mode] / (n * args.reps) * 1e3, 2),
                             "client": args.client,  # texts compared stripped (the peer returns them unstripped)
                             "same_texts": f"{sum(a.strip() == b for g in got for a, b in zip(g[2], want[:n]))}/{n * len(got)}"})
                print(json.dumps(rows[-1], ensure_ascii=False), flush=True)
        if args.stall and "continuous" in servers:
            print(json.dumps({"stall": stall_test(servers["continuous"][1])}, ensure_ascii=False), flush=True)
    finally:
        for proc, _ in procs.values():
            proc.kill()
            proc.wait()
    names = [m for m, *_ in modes]
    print(f"model {args.model}; client {args.client}; {args.new} new tokens; req/s (p50/p95 s; server CPU per request)")
    print("| concurrency | " + " | ".join(names) + " | × vs " + names[0] + " |")
    for c in sorted({r["concurrency"] for r in rows}):
        got = {r["mode"]: r for r in rows if r["concurrency"] == c}
        one = got[names[0]]["req_per_s"]
        cells = [f"{got[m]['req_per_s']} ({got[m]['p50_s']}/{got[m]['p95_s']}; {got[m]['server_cpu_ms_per_req']} ms)"
                 for m in names]
        ratios = ", ".join(f"{m}: {got[m]['req_per_s'] / one:.2f}" for m in names[1:])
        print(f"| {c} | " + " | ".join(cells) + f" | {ratios} |")
    if "continuous" in names and len(names) > 1:
        for c in sorted({r["concurrency"] for r in rows}):
            got = {r["mode"]: r["req_per_s"] for r in rows if r["concurrency"] == c}
            vs = {m: round(got["continuous"] / got[m], 2) for m in names if m != "continuous"}
            print(json.dumps({"concurrency": c, "continuous_over": vs}), flush=True)


if __name__ == "__main__":
    main()
