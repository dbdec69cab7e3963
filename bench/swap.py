"""Cold start of an on-demand instance through the router, against starting
the same llama-server by hand, in one run (issue 9).

    python bench/swap.py [--rounds 5] [--model PATH]

Through the router: the instance is stopped (`on_demand`), a streamed chat
request names it; measured until the first token arrives (the router starts
it, waits for the load, forwards). By hand: the same argv and environment
started directly, /health polled every 50 ms, then the same request; measured
from the spawn to the first token. Rounds interleaved, medians compared.
Target: the router adds <= 0.3 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # noqa: E402
    POLL,
    cli,
    free_port,
    model_and_binary,
    wait_healthy,
    write_instance,
)

from llama_orchestrator.config.command import build_launch  # noqa: E402
from llama_orchestrator.config.parse import load_config  # noqa: E402
from llama_orchestrator.models.catalog import model_file

BODY = {
    "model": "od",
    "messages": [{"role": "user", "content": "Hello"}],
    "max_tokens": 4,
    "stream": True,
}


def first_token(client: httpx.Client, url: str) -> None:
    """Send the streamed request; return when the first content chunk arrives."""
    with client.stream("POST", f"{url}/v1/chat/completions", json=BODY) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                return
    raise RuntimeError("no token came")


def through_router(home: Path, client: httpx.Client, router: str) -> float:
    t0 = time.perf_counter()
    first_token(client, router)
    took = time.perf_counter() - t0
    cli(home, "down", "od")
    return took


def by_hand(home: Path, client: httpx.Client, binary: Path, port: int) -> float:
    cfg_path = home / "instances" / "od" / "config.json"
    cfg = load_config(cfg_path)
    launch = build_launch(cfg, "od", binary, model_file(cfg.model.path, cfg_path.parent), {}, home)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        launch.argv, env=launch.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_healthy(client, port, timeout=300)
        first_token(client, f"http://127.0.0.1:{port}")
        return time.perf_counter() - t0
    finally:  # not measured; SIGTERM waits for idle keep-alive connections to close
        proc.kill()
        proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--model", help="a GGUF model (default: the generated tiny one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        model, binary = model_and_binary(tmp, args.model)
        home = tmp / "home"
        port, router_port = free_port(), free_port()
        write_instance(home, "od", model, port, {"parallel": 1}, threads=2, context_size=2048)
        cfg_path = home / "instances" / "od" / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["on_demand"] = {"idle_ttl": 600}
        cfg_path.write_text(json.dumps(cfg))
        (home / "llama-orch.json").write_text(json.dumps({"router": {"port": router_port}}))
        cli(home, "daemon", "start")
        router = f"http://127.0.0.1:{router_port}"
        routed, direct = [], []
        try:
            with httpx.Client(timeout=300) as client:
                by_hand(home, client, binary, port)  # warm the page cache
                for _ in range(args.rounds):
                    direct.append(by_hand(home, client, binary, port))
                    routed.append(through_router(home, client, router))
        finally:
            cli(home, "daemon", "stop", "--all")
    d, r = statistics.median(direct), statistics.median(routed)
    print(f"cold start to first token, {model.name}, median of {args.rounds}")
    print(f"  by hand (spawn, poll /health every {POLL * 1000:.0f} ms, request): {d:.3f} s")
    print(f"  through the router (request for a stopped on-demand instance): {r:.3f} s")
    print(f"  ratio {r / d:.2f}x; added {r - d:+.3f} s")
    print(f"target: added <= 0.3 s: {r - d:+.3f} s {'OK' if r - d <= 0.3 else 'MISSED'}")


if __name__ == "__main__":
    main()
