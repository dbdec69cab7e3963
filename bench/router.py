"""What the router costs and what it buys, in one run:

1. overhead: the same requests sent straight to one llama-server, through
   llama-orch's router and through nginx (Debian's, as a plain reverse proxy),
   at concurrency 1, 8 and 32, interleaved; plus streaming time to first byte;
2. slot-aware balancing: 200 requests at concurrency 8 over two replicas, one
   with `parallel: 1` and one with `parallel: 4`, through the router and
   through nginx's round-robin upstream (on a generated model whose tokens
   are memory-bound, see WIDE, or on --model);
3. the upstream client choice: httpx, aiohttp and llama-orch's own
   (wire/pool.py), straight to the instance.

    python bench/router.py [--requests 300] [--model PATH]

Targets (issue 4): throughput through the router >= 0.9x direct at
concurrency 8 and added p50 <= 2 ms; the router finishes part 2 >= 1.3x
faster than round-robin.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).parent))
from _common import cli, free_port, model_and_binary, write_instance  # noqa: E402

from llama_orchestrator.models.tiny import write_tiny_model  # noqa: E402
from llama_orchestrator.wire.pool import Pool  # noqa: E402

BODY = {"model": "a", "prompt": "Hi", "n_predict": 4, "cache_prompt": True}
# part 2: long enough that where a request waits matters more than the proxy
LONG = {"model": "rr", "prompt": "Once", "ignore_eos": True}
# Part 2's generated model: wide F32 layers, so that a token costs reading the
# weights (memory-bound, as a real model on a GPU) and a batch of 4 sequences
# costs little more than 1. On the tiny model a token's cost is per sequence
# (sampling, bookkeeping): 4 slots hold no more capacity than 1, and knowing
# the slots cannot help (measured: parallel 4 at concurrency 4 gave 1.04x the
# requests/s of concurrency 1 on the tiny model, 2.9x on this one).
WIDE = {"n_layer": 2, "n_embd": 1024, "n_head": 16, "n_head_kv": 8, "n_ff": 4096, "n_ctx": 4096}


async def run_httpx(url: str, n: int, conc: int) -> tuple[float, list[float]]:
    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def one() -> None:
            (await client.post(url, json=BODY)).raise_for_status()

        return await _drive(one, n, conc)


async def run_aiohttp(url: str, n: int, conc: int, body: dict = BODY) -> tuple[float, list[float]]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc)) as session:

        async def one() -> None:
            async with session.post(url, json=body) as r:
                await r.read()
                r.raise_for_status()

        return await _drive(one, n, conc)


async def run_upstream(url: str, n: int, conc: int) -> tuple[float, list[float]]:
    """llama-orch's own upstream client (what the router forwards with)."""
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    path = "/" + url.removeprefix("http://").split("/", 1)[1]
    up, body = Pool(), json.dumps(BODY).encode()
    headers = {"Content-Type": "application/json"}

    async def one() -> None:
        ex = await up.open(host, int(port), "POST", path, headers, body)
        await ex.body()
        up.finish(ex)
        assert ex.status == 200

    try:
        return await _drive(one, n, conc)
    finally:
        up.close()


async def _drive(
    send: Callable[[], Awaitable[None]], n: int, conc: int
) -> tuple[float, list[float]]:
    latencies: list[float] = []
    todo = iter(range(n))

    async def worker() -> None:
        for _ in todo:
            t = time.perf_counter()
            await send()
            latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    return n / (time.perf_counter() - t0), latencies


async def first_byte(url: str, n: int) -> list[float]:
    """Streaming: seconds from sending to the first SSE chunk, one at a time."""
    body = {**BODY, "n_predict": 16, "stream": True}
    out = []
    connector = aiohttp.TCPConnector(force_close=True)  # a fresh connection each
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(n):
            t = time.perf_counter()
            async with session.post(url, json=body) as r:
                await r.content.readany()
                out.append(time.perf_counter() - t)
                await r.read()
    return out


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] * 1000


def start_nginx(folder: Path, upstreams: list[int], port: int) -> subprocess.Popen | None:
    """nginx as a plain reverse proxy with its default round-robin upstream."""
    exe = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if exe is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    servers = " ".join(f"server 127.0.0.1:{p};" for p in upstreams)
    temps = " ".join(
        f"{kind}_temp_path {folder / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (folder / "nginx.conf").write_text(
        f"""worker_processes 1; daemon off; pid {folder / "nginx.pid"};
error_log {folder / "error.log"};
events {{ worker_connections 4096; }}
http {{
  access_log off; {temps}
  upstream llama {{ {servers} }}
  server {{
    listen 127.0.0.1:{port};
    location / {{ proxy_pass http://llama; proxy_buffering off; proxy_read_timeout 600s; }}
  }}
}}
"""
    )
    proc = subprocess.Popen(
        [exe, "-p", str(folder), "-c", str(folder / "nginx.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"nginx did not listen; see {folder / 'error.log'}")


def overhead(urls: dict[str, str], requests: int, rounds: int) -> tuple[float, float]:
    print(f"1. {requests} /completion requests (n_predict 4), parallel 8, medians of {rounds} runs")
    names = [n for n in urls if n != "direct"]
    print(
        f"{'conc':>4} {'direct req/s':>13} "
        + " ".join(f"{n + ' req/s':>12} {'ratio':>6} {'+p50 ms':>8} {'+p99 ms':>8}" for n in names)
    )
    result = (0.0, 0.0)
    for conc in (1, 8, 32):
        rates: dict[str, list[float]] = {n: [] for n in urls}
        lats: dict[str, list[float]] = {n: [] for n in urls}
        for _ in range(rounds):  # interleaved: drift hits every path alike
            for name, url in urls.items():
                rate, lat = asyncio.run(run_aiohttp(url, requests, conc))
                rates[name].append(rate)
                lats[name] += lat
        d = statistics.median(rates["direct"])
        row = f"{conc:>4} {d:>13.0f} "
        for n in names:
            r = statistics.median(rates[n])
            p50 = pct(lats[n], 0.5) - pct(lats["direct"], 0.5)
            p99 = pct(lats[n], 0.99) - pct(lats["direct"], 0.99)
            row += f"{r:>12.0f} {r / d:>6.2f} {p50:>8.2f} {p99:>8.2f} "
            if n == "router" and conc == 8:
                result = (r / d, p50)
        print(row)
    print("   streaming, time to first byte (p50 ms of 30, one at a time):")
    ttfb = {n: pct(asyncio.run(first_byte(u, 30)), 0.5) for n, u in urls.items()}
    print("   " + "  ".join(f"{n} {v:.2f}" for n, v in ttfb.items()))
    return result


def balancing(router_url: str, nginx_url: str | None, tokens: int, rounds: int) -> float | None:
    print(f"2. 200 requests (n_predict {tokens}) at concurrency 8 over parallel 1 + parallel 4")
    if nginx_url is None:
        print("   nginx not installed (apt install nginx-light): skipped")
        return None
    times: dict[str, list[float]] = {"router": [], "nginx round-robin": []}
    for _ in range(rounds):
        for name, url in (("router", router_url), ("nginx round-robin", nginx_url)):
            rate, _ = asyncio.run(run_aiohttp(url, 200, 8, {**LONG, "n_predict": tokens}))
            times[name].append(200 / rate)
    r, n = statistics.median(times["router"]), statistics.median(times["nginx round-robin"])
    print(f"   router {r:.2f} s  nginx round-robin {n:.2f} s  speed-up {n / r:.2f}x")
    return n / r


def upstream_client(direct: str, requests: int, rounds: int) -> None:
    print(f"3. upstream client, straight to the instance (req/s, median of {rounds})")
    clients = {"httpx": run_httpx, "aiohttp": run_aiohttp, "llama-orch": run_upstream}
    for conc in (8, 32):
        rates: dict[str, list[float]] = {name: [] for name in clients}
        for _ in range(rounds):
            for name, run in clients.items():
                rates[name].append(asyncio.run(run(direct, requests, conc))[0])
        m = {name: statistics.median(r) for name, r in rates.items()}
        print(
            f"   conc {conc:>2}: "
            + "  ".join(f"{name} {rate:7.0f}" for name, rate in m.items())
            + f"  llama-orch/aiohttp {m['llama-orch'] / m['aiohttp']:.2f}x"
            + f"  llama-orch/httpx {m['llama-orch'] / m['httpx']:.2f}x"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--model", help="a GGUF model (default: the generated tiny one)")
    ap.add_argument("--rounds", type=int, default=3, help="runs per measurement")
    ap.add_argument("--tokens", type=int, default=16, help="n_predict in part 2")
    ap.add_argument("--gpu", action="store_true", help="offload every instance to CUDA GPU 0")
    args = ap.parse_args()
    gpu = {"backend": "cuda", "device_id": 0, "layers": -1} if args.gpu else None
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        model, _ = model_and_binary(tmp, args.model)
        wide = Path(args.model) if args.model else write_tiny_model(tmp / "wide.gguf", **WIDE)
        home, router_port = tmp / "home", free_port()
        ports = {name: free_port() for name in ("a", "p1", "p4")}
        write_instance(home, "a", model, ports["a"], {"parallel": 8}, gpu, context_size=2048)
        # two servers sharing the cores: one thread each, or they spin on each other
        for name, slots in (("p1", 1), ("p4", 4)):
            write_instance(
                home, name, wide, ports[name], {"parallel": slots}, gpu,
                alias="rr", threads=1, context_size=1024 * slots,
            )  # fmt: skip
        (home / "llama-orch.json").write_text(json.dumps({"router": {"port": router_port}}))
        nginx = start_nginx(tmp / "nginx1", [ports["a"]], nginx_port := free_port())
        nginx_rr = start_nginx(tmp / "nginx2", [ports["p1"], ports["p4"]], rr_port := free_port())
        cli(home, "up", "a")
        urls = {"direct": f"http://127.0.0.1:{ports['a']}/completion"}
        urls["router"] = f"http://127.0.0.1:{router_port}/completion"
        if nginx:
            urls["nginx"] = f"http://127.0.0.1:{nginx_port}/completion"
        try:
            for url in urls.values():  # warm up every path
                asyncio.run(run_aiohttp(url, 50, 4))
            ratio, p50 = overhead(urls, args.requests, args.rounds)
            upstream_client(urls["direct"], args.requests, args.rounds)
            cli(home, "down", "a")
            cli(home, "up", "p1", "p4")
            speedup = balancing(
                urls["router"],
                f"http://127.0.0.1:{rr_port}/completion" if nginx_rr else None,
                args.tokens,
                args.rounds,
            )
        finally:
            cli(home, "daemon", "stop", "--all")
            for proc in (nginx, nginx_rr):
                if proc:
                    proc.terminate()
                    proc.wait()
    print(
        f"targets: router throughput >= 0.9x direct at conc 8: {ratio:.2f}x "
        f"{'OK' if ratio >= 0.9 else 'MISSED'}; added p50 <= 2 ms: {p50:.2f} ms "
        f"{'OK' if p50 <= 2 else 'MISSED'}; >= 1.3x faster than round-robin: "
        + ("n/a" if speedup is None else f"{speedup:.2f}x {'OK' if speedup >= 1.3 else 'MISSED'}")
    )


if __name__ == "__main__":
    main()
