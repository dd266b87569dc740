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


def load(url: str, prompts: list[str], concurrency: int, new: int, client: str = "raw") -> tuple[float, list[float], list[str]]:
    """`concurrency` clients, each sending its next request as soon as the last is answered; (wall s,
    latency per request, answer texts). client "raw": keep-alive HTTP/1.1 on asyncio streams (≈ 0.2 ms
    of CPU a request, as wrk-like load generators are); "httpx": one httpx.AsyncClient (≈ 2 ms a
    request, which on a 2-core machine is taken from the server's second core)."""
    import asyncio

    latencies: list[float] = [0.0] * len(prompts)
    texts: list[str] = [""] * len(prompts)
    next_i = iter(range(len(prompts)))
    body = lambda i: {"messages": [{"role": "user", "content": prompts[i]}], "max_tokens": new}  # noqa: E731

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


MODES = (("one at a time", "static", 1), ("micro-batched", "static", 32), ("continuous", "continuous", 32))


def serve_only(port: int, batching: str, max_batch: int, threads: int) -> None:
    """The server process: the redrawn tiny model behind build_app, until killed."""
    import torch

    from medpipe.commands.serve import Limits, build_app, make_server
    from test_serve_limits import varied_tiny

    torch.set_num_threads(threads)
    app = build_app(varied_tiny(), "tiny", limits=Limits(max_batch=max_batch, batching=batching))
    print(json.dumps({"server": port, "batching": app.state.batching, "max_batch": max_batch}), flush=True)
    make_server(app, "127.0.0.1", port, log_level="warning").run()


def start_server(batching: str, max_batch: int, threads: int):
    import subprocess

    import httpx

    from medpipe.commands.serve import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve-only", str(port), "--batching", batching, "--max-batch", str(max_batch),
                             "--threads", str(threads)], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
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
    args = ap.parse_args()
    if args.serve_only:
        return serve_only(args.serve_only, args.batching, args.max_batch, args.threads)
    import torch

    from test_serve_limits import questions, varied_tiny

    torch.set_num_threads(args.threads)
    model = varied_tiny()
    prompts = questions(args.requests)
    want = [model.chat([{"role": "user", "content": q}], max_new_tokens=args.new).text for q in prompts]
    # the ceiling batching can reach here: 8 prompts as one generate vs one by one, no HTTP
    rendered = [model.render([{"role": "user", "content": q}]) for q in prompts[:8]]
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
    servers = {mode: start_server(batching, max_batch, args.threads) for mode, batching, max_batch in MODES}
    try:
        for mode, (_, url) in servers.items():
            load(url, prompts[:4], 2, args.new, args.client)  # warm-up
        for c in [int(x) for x in args.concurrency.split(",")]:
            n = len(prompts) if c > 1 else max(8, len(prompts) // 4)
            runs: dict[str, list] = {mode: [] for mode in servers}
            cpu: dict[str, float] = {mode: 0.0 for mode in servers}
            for r in range(args.reps):  # modes alternate, order flipped every rep: load drifts hit all
                for mode in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
                    proc, url = servers[mode]
                    before = cpu_seconds(proc.pid)
                    runs[mode].append(load(url, prompts[:n], c, args.new, args.client))
                    cpu[mode] += cpu_seconds(proc.pid) - before
            for mode, got in runs.items():
                wall = statistics.median(g[0] for g in got)
                lat = [x for g in got for x in g[1]]
                rows.append({"mode": mode, "concurrency": c, "requests": n, "reps": args.reps,
                             "req_per_s": round(n / wall, 2), "p50_s": round(statistics.median(lat), 3),
                             "p95_s": round(pct(lat, 0.95), 3), "server_cpu_ms_per_req": round(cpu[mode] / (n * args.reps) * 1e3, 2),
                             "client": args.client, "same_as_sequential": all(g[2] == want[:n] for g in got)})
                print(json.dumps(rows[-1], ensure_ascii=False), flush=True)
        print(json.dumps({"stall": stall_test(servers["continuous"][1])}, ensure_ascii=False), flush=True)
    finally:
        for proc, _ in servers.values():
            proc.kill()
            proc.wait()
    print(f"client {args.client}; req/s (p50/p95 s; server CPU per request)")
    print("| concurrency | " + " | ".join(f"{m}" for m, *_ in MODES) + " | × vs one at a time |")
    for c in sorted({r["concurrency"] for r in rows}):
        got = {r["mode"]: r for r in rows if r["concurrency"] == c}
        one = got[MODES[0][0]]["req_per_s"]
        cells = [f"{got[m]['req_per_s']} ({got[m]['p50_s']}/{got[m]['p95_s']}; {got[m]['server_cpu_ms_per_req']} ms)"
                 for m, *_ in MODES]
        ratios = ", ".join(f"{got[m]['req_per_s'] / one:.2f}" for m, *_ in MODES[1:])
        print(f"| {c} | " + " | ".join(cells) + f" | {ratios} |")


if __name__ == "__main__":
    main()
