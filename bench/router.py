"""What the router costs: the same requests sent straight to one llama-server
and through llama-orch's router (to that instance alone), at concurrency 1, 8
and 32, interleaved in one run; plus the upstream-client choice: httpx against
aiohttp, each sending the same requests straight to the instance.

    python bench/router.py [--requests 400] [--model PATH]

Targets (issue 4): throughput through the router >= 0.9x direct at
concurrency 8; added p50 latency <= 2 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).parent))
from _common import cli, free_port, model_and_binary, write_instance  # noqa: E402

BODY = {"prompt": "Hi", "n_predict": 4, "cache_prompt": True}


async def run_httpx(url: str, n: int, conc: int) -> tuple[float, list[float]]:
    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        return await _drive(lambda: client.post(url, json=BODY), n, conc)


async def run_aiohttp(url: str, n: int, conc: int) -> tuple[float, list[float]]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc)) as session:

        async def one() -> None:
            async with session.post(url, json=BODY) as r:
                await r.read()
                r.raise_for_status()

        return await _drive(one, n, conc)


async def _drive(send, n: int, conc: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    todo = iter(range(n))

    async def worker() -> None:
        for _ in todo:
            t = time.perf_counter()
            r = await send()
            if r is not None:
                r.raise_for_status()
            latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    return n / (time.perf_counter() - t0), latencies


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--model", help="a GGUF model (default: the generated tiny one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        model, _ = model_and_binary(tmp, args.model)
        home, port, router_port = tmp / "home", free_port(), free_port()
        write_instance(home, "a", model, port)
        cfg_path = home / "instances" / "a" / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["server"]["parallel"] = 8
        cfg["model"]["context_size"] = 2048
        cfg_path.write_text(json.dumps(cfg))
        (home / "llama-orch.json").write_text(json.dumps({"router": {"port": router_port}}))
        cli(home, "up", "a")
        direct = f"http://127.0.0.1:{port}/completion"
        routed = f"http://127.0.0.1:{router_port}/completion"
        try:
            asyncio.run(run_aiohttp(direct, 50, 4))  # warm up both paths
            asyncio.run(run_aiohttp(routed, 50, 4))
            print(
                f"{args.requests} /completion requests (n_predict 4), parallel 8, medians of 3 runs"
            )
            print(
                f"{'conc':>4} {'direct req/s':>13} {'router req/s':>13} {'ratio':>6} "
                f"{'+p50 ms':>8} {'+p99 ms':>8}"
            )
            summary = {}
            for conc in (1, 8, 32):
                d_rates, r_rates, d_lat, r_lat = [], [], [], []
                for _ in range(3):  # interleaved: drift hits both alike
                    rate, lat = asyncio.run(run_aiohttp(direct, args.requests, conc))
                    d_rates.append(rate)
                    d_lat += lat
                    rate, lat = asyncio.run(run_aiohttp(routed, args.requests, conc))
                    r_rates.append(rate)
                    r_lat += lat
                d, r = statistics.median(d_rates), statistics.median(r_rates)
                p50 = pct(r_lat, 0.5) - pct(d_lat, 0.5)
                p99 = pct(r_lat, 0.99) - pct(d_lat, 0.99)
                summary[conc] = (r / d, p50)
                print(f"{conc:>4} {d:>13.0f} {r:>13.0f} {r / d:>6.2f} {p50:>8.2f} {p99:>8.2f}")

            print("upstream client, straight to the instance (req/s, median of 3)")
            for conc in (8, 32):
                rates = {"httpx": [], "aiohttp": []}
                for _ in range(3):
                    rates["httpx"].append(asyncio.run(run_httpx(direct, args.requests, conc))[0])
                    rates["aiohttp"].append(
                        asyncio.run(run_aiohttp(direct, args.requests, conc))[0]
                    )
                h, a = statistics.median(rates["httpx"]), statistics.median(rates["aiohttp"])
                print(
                    f"  conc {conc:>2}: httpx {h:7.0f}  aiohttp {a:7.0f}  aiohttp/httpx {a / h:.2f}x"
                )
        finally:
            cli(home, "daemon", "stop", "--all")
    ratio, p50 = summary[8]
    print(
        f"target: throughput >= 0.9x direct at concurrency 8: {ratio:.2f}x "
        f"{'OK' if ratio >= 0.9 else 'MISSED'}; added p50 <= 2 ms: {summary[8][1]:.2f} ms "
        f"{'OK' if p50 <= 2 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
