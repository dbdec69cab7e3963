"""What peers cost (issue 16), in one run:

1. the added latency of a request routed A -> B against the same request
   sent to B's router directly: one real llama-server on the tiny model
   behind B, requests interleaved one by one (direct, through A, direct, ...)
   at concurrency 1 so that both see the same machine; p50 and p99 of each;
2. the peer-state refresh on A's daemon: A with 3 peers of 10 healthy
   instances each, looked at every second (the default `refresh`), next to
   A0, a daemon with no peers, over the same window: CPU % of one core and
   peak RSS of each; the difference is what the peers cost.

All hosts are homes on this machine's loopback (the hop is what is measured,
not a network).

    python bench/peers.py [--requests 400] [--seconds 30] [--instances 10]

Targets: added p50 <= 1 ms over the direct hop; refresh <= 1 % CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).parent))
from _common import cli, free_port, model_and_binary, pct, wait_healthy, write_instance  # noqa: E402
from daemon_footprint import measure  # noqa: E402

#: only B serves `solo`: a request for it goes to B, directly or through A
BODY = {"model": "solo", "prompt": "Hi", "n_predict": 1, "cache_prompt": True}
P50_TARGET_MS = 1.0
CPU_TARGET_PCT = 1.0
KEY = "bench-key"


def make_peer(tmp: Path, name: str, model: Path, n: int) -> tuple[Path, int, list[int]]:
    """A home with `n` instances of alias `tiny` and a router with a key."""
    home = tmp / name
    router = free_port()
    ports = [free_port() for _ in range(n)]
    for i, port in enumerate(ports):
        write_instance(home, f"{name}{i}", model, port, alias="tiny", threads=1)
    (home / "llama-orch.json").write_text(
        json.dumps({"router": {"port": router, "api_keys": [KEY]}})
    )
    return home, router, ports


def make_a(tmp: Path, name: str, peers: list[tuple[str, int]]) -> tuple[Path, int]:
    home = tmp / name
    (home / "instances").mkdir(parents=True)
    (home / "peer.key").write_text(KEY)
    router = free_port()
    settings = {
        "router": {"port": router},
        "peers": [
            {"name": p, "url": f"http://127.0.0.1:{port}", "api_key_file": "peer.key"}
            for p, port in peers
        ],
    }
    (home / "llama-orch.json").write_text(json.dumps(settings))
    cli(home, "daemon", "start")
    return home, router


def daemon_of(home: Path) -> psutil.Process:
    return psutil.Process(json.loads((home / "state" / "daemon.json").read_text())["pid"])


def wait_models(client: httpx.Client, router: int, want: int, timeout: float = 60) -> None:
    """Until A's router lists `want` replicas of tiny across its peers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = client.get(f"http://127.0.0.1:{router}/v1/models").json()["data"]
        if any(m["id"] == "tiny" and len(m.get("hosts", [])) >= want for m in data):
            return
        time.sleep(0.1)
    raise RuntimeError("A's router never saw its peers' models")


def latency(client: httpx.Client, direct: str, via: str, n: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"direct": [], "via A": []}
    headers = {"Authorization": f"Bearer {KEY}"}
    for i in range(n + 20):
        for label, url in (("direct", direct), ("via A", via)):
            t = time.perf_counter()
            r = client.post(url, json=BODY, headers=headers if label == "direct" else {})
            r.raise_for_status()
            if i >= 20:  # after warm-up: connections open, the prompt cached
                times[label].append((time.perf_counter() - t) * 1000)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--instances", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as t, httpx.Client(timeout=60) as client:
        tmp = Path(t)
        model, _ = model_and_binary(tmp, None)
        homes: list[Path] = []
        try:
            peers = []
            for name in ("b", "c", "d"):
                home, router, ports = make_peer(tmp, name, model, args.instances)
                homes.append(home)
                cli(home, "up", "--all", "--no-wait")
                peers.append((name, router, ports))
            for _, _, ports in peers:
                for port in ports:
                    wait_healthy(client, port, timeout=300)
            a, a_router = make_a(tmp, "a", [(n, r) for n, r, _ in peers])
            a0, _ = make_a(tmp, "a0", [])
            homes += [a, a0]
            wait_models(client, a_router, len(peers))

            # 1. B's router direct vs A -> B
            solo_port = free_port()
            write_instance(homes[0], "solo", model, solo_port, alias="solo", threads=1)
            cli(homes[0], "up", "solo")
            deadline = time.monotonic() + 30
            while (
                client.post(f"http://127.0.0.1:{a_router}/completion", json=BODY).status_code != 200
            ):
                if time.monotonic() > deadline:
                    raise RuntimeError("A never routed solo to B")
                time.sleep(0.2)
            times = latency(
                client,
                f"http://127.0.0.1:{peers[0][1]}/completion",
                f"http://127.0.0.1:{a_router}/completion",
                args.requests,
            )
            cli(homes[0], "down", "solo")

            # 2. refresh cost: A (3 peers) next to A0 (none), the same window
            time.sleep(2)
            results = measure(
                {"A, 3 peers": daemon_of(a), "A0, no peers": daemon_of(a0)}, args.seconds
            )
        finally:
            for home in homes:
                cli(home, "daemon", "stop", "--all")

    d50, d99 = pct(times["direct"], 50), pct(times["direct"], 99)
    v50, v99 = pct(times["via A"], 50), pct(times["via A"], 99)
    print(f"1. {args.requests} requests each, interleaved, concurrency 1 (/completion, 1 token)")
    print(f"   {'':<14}{'p50':>9}{'p99':>9}")
    print(f"   {'B direct':<14}{d50:>7.2f}ms{d99:>7.2f}ms")
    print(f"   {'A -> B':<14}{v50:>7.2f}ms{v99:>7.2f}ms")
    added = v50 - d50
    print(
        f"   added by the hop through A: p50 {added:+.2f} ms ({v50 / d50:.2f}x), "
        f"p99 {v99 - d99:+.2f} ms; target <= {P50_TARGET_MS:g} ms: "
        f"{'OK' if added <= P50_TARGET_MS else 'MISSED'}"
    )
    (rss, cpu), (rss0, cpu0) = results["A, 3 peers"], results["A0, no peers"]
    print(
        f"2. {len(peers)} peers x {args.instances} instances, refresh 1 s, {args.seconds:g} s window"
    )
    print(f"   {'daemon':<14}{'peak RSS':>10}{'CPU':>8}")
    for name, (r, c) in results.items():
        print(f"   {name:<14}{r:>8.1f}MB{c:>7.2f}%")
    cost = cpu - cpu0
    print(
        f"   the peers cost {cost:+.2f} % of a core and {rss - rss0:+.1f} MB "
        f"(CPU {cpu / max(cpu0, 1e-9):.2f}x the daemon without peers); target <= "
        f"{CPU_TARGET_PCT:g} %: {'OK' if cost <= CPU_TARGET_PCT else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
