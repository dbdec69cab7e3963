"""How fast a crashed llama-server is back: llama-orch's daemon next to
supervisord and pm2 supervising the same command, in one run.

Each round kills the running llama-server with SIGKILL and measures the time
until a replacement process exists ("respawn") and until it answers /health
with 200 ("healthy"). llama-orch runs with `backoff_initial: 0` (restart at
once, like pm2's `--restart-delay 0`); supervisord as configured by most
people (`autorestart=true`, `startsecs=0`); pm2 with `--restart-delay 0`.
supervisord and pm2 are benchmark-only tools: a missing one is skipped.

    python bench/restart_latency.py [--rounds 10] [--model PATH]

Target (issue 3): llama-orch's median respawn minus its configured first
delay (0 here) <= 0.05 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # noqa: E402
    cli,
    free_port,
    model_and_binary,
    start_supervisord,
    stop_supervisord,
    supervisord_exe,
    wait_healthy,
    write_instance,
)

TARGET_S = 0.05


def server_pids(port: int) -> set[int]:
    """PIDs of processes whose command line holds `--port PORT` (from /proc: ~1 ms)."""
    needle = f"--port\0{port}\0".encode()
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read()
                with open(f"/proc/{entry}/stat", "rb") as f:
                    zombie = f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
            except OSError:
                continue
            if needle in cmd and not zombie:
                out.add(int(entry))
    return out


def one_round(port: int, client: httpx.Client) -> tuple[float, float]:
    (pid,) = wait_for(lambda: (p := server_pids(port)) and len(p) == 1 and p, 30)
    wait_healthy(client, port)
    time.sleep(0.3)  # let the supervisor settle into "running"
    t0 = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: server_pids(port) - {pid}, 30, interval=0.0005)
    respawn = time.perf_counter() - t0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if client.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.001)
    return respawn, time.perf_counter() - t0


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.01) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise RuntimeError("timed out")


def argv(binary: Path, model: Path, port: int) -> list[str]:
    return [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port)]


def run_llama_orch(tmp: Path, binary: Path, model: Path, rounds: int, client: httpx.Client):
    import json

    home, port = tmp / "orch", free_port()
    write_instance(home, "a", model, port)
    cfg_path = home / "instances" / "a" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["restart_policy"] = {"mode": "always", "backoff_initial": 0, "max_retries": 10_000}
    cfg_path.write_text(json.dumps(cfg))
    cli(home, "up", "a")
    try:
        return [one_round(port, client) for _ in range(rounds)]
    finally:
        cli(home, "daemon", "stop", "--all")


def run_supervisord(tmp: Path, binary: Path, model: Path, rounds: int, client: httpx.Client):
    if supervisord_exe() is None:
        return "supervisord not installed (pip install supervisor)"
    port = free_port()
    command = " ".join(argv(binary, model, port))
    conf = start_supervisord(
        tmp / "supervisord", {"llama": command}, "startsecs=0\nstartretries=10000\n"
    )
    try:
        return [one_round(port, client) for _ in range(rounds)]
    finally:
        stop_supervisord(conf)
        wait_for(lambda: not server_pids(port), 30)


def run_pm2(tmp: Path, binary: Path, model: Path, rounds: int, client: httpx.Client):
    exe = shutil.which("pm2")
    if exe is None:
        return "pm2 not installed (npm install -g pm2)"
    port = free_port()
    env = {**os.environ, "PM2_HOME": str(tmp / "pm2")}
    cmd = [exe, "start", str(binary), "--name", "llama", "--interpreter", "none"]
    cmd += ["--restart-delay", "0", "--", *argv(binary, model, port)[1:]]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    try:
        return [one_round(port, client) for _ in range(rounds)]
    finally:
        subprocess.run([exe, "kill"], env=env, capture_output=True)
        wait_for(lambda: not server_pids(port), 30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--model", help="a GGUF model (default: the generated tiny one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as t, httpx.Client() as client:
        tmp = Path(t)
        model, binary = model_and_binary(tmp, args.model)
        results: dict[str, list[tuple[float, float]] | str] = {}
        for name, fn in (
            ("llama-orch", run_llama_orch),
            ("supervisord", run_supervisord),
            ("pm2", run_pm2),
        ):
            results[name] = fn(tmp, binary, model, args.rounds, client)

    print(f"kill -9 of llama-server -> replacement ({args.rounds} rounds, medians)")
    print(f"{'supervisor':<12} {'respawn':>10} {'healthy':>10}")
    medians: dict[str, tuple[float, float]] = {}
    for name, res in results.items():
        if isinstance(res, str):
            print(f"{name:<12} skipped: {res}")
            continue
        m = (statistics.median(r[0] for r in res), statistics.median(r[1] for r in res))
        medians[name] = m
        print(f"{name:<12} {m[0] * 1000:>8.1f}ms {m[1] * 1000:>8.1f}ms")
    ours = medians["llama-orch"]
    for other in ("pm2", "supervisord"):
        if other in medians:
            o = medians[other]
            print(
                f"llama-orch / {other}: respawn {ours[0] / o[0]:.2f}x, healthy {ours[1] / o[1]:.2f}x"
            )
    ok = ours[0] <= TARGET_S
    print(
        f"target: respawn minus configured delay (0 s) <= {TARGET_S * 1000:.0f} ms: "
        f"{ours[0] * 1000:.1f} ms {'OK' if ok else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
