"""What supervising costs: llama-orch's daemon with 10 healthy instances
health-checked every second, next to supervisord supervising 10 of the same
llama-server (it does no health checks), measured side by side in one run.

Both sets run at the same time, so the machine's noise hits both alike. For
each supervisor process: RSS (peak of 1 s samples) and CPU time over the window
as a percentage of one core.

    python bench/daemon_footprint.py [--seconds 60] [--instances 10] [--model PATH]

Targets (issue 3): daemon RSS <= 80 MB, CPU <= 2 % of one core.
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

RSS_TARGET_MB = 80
CPU_TARGET_PCT = 2.0


def start_llama_orch(tmp: Path, model: Path, n: int, client: httpx.Client) -> psutil.Process:
    home = tmp / "orch"
    ports = [free_port() for _ in range(n)]
    for i, port in enumerate(ports):
        write_instance(home, f"i{i}", model, port)
        path = home / "instances" / f"i{i}" / "config.json"
        cfg = json.loads(path.read_text())
        cfg["healthcheck"] = {"interval": 1, "timeout": 1}
        path.write_text(json.dumps(cfg))
    cli(home, "up", "--all")
    for port in ports:
        wait_healthy(client, port)
    info = json.loads((home / "state" / "daemon.json").read_text())
    return psutil.Process(info["pid"])


def run_supervisord(
    tmp: Path, binary: Path, model: Path, n: int, client: httpx.Client
) -> tuple[psutil.Process, Path] | None:
    if supervisord_exe() is None:
        return None
    ports = [free_port() for _ in range(n)]
    commands = {
        f"i{i}": f"{binary} -m {model} --host 127.0.0.1 --port {port} -c 512 -np 1"
        for i, port in enumerate(ports)
    }
    conf = start_supervisord(tmp / "supervisord", commands)
    for port in ports:
        wait_healthy(client, port)
    pid = int((conf.parent / "supervisord.pid").read_text())
    return psutil.Process(pid), conf


def measure(procs: dict[str, psutil.Process], seconds: float) -> dict[str, tuple[float, float]]:
    """name -> (peak RSS in MB, CPU % of one core over the window)."""
    start = {n: p.cpu_times() for n, p in procs.items()}
    peak = {n: 0.0 for n in procs}
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        for n, p in procs.items():
            peak[n] = max(peak[n], p.memory_info().rss / 2**20)
        time.sleep(1)
    wall = time.monotonic() - t0
    out = {}
    for n, p in procs.items():
        end = p.cpu_times()
        used = (end.user - start[n].user) + (end.system - start[n].system)
        out[n] = (peak[n], 100 * used / wall)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--instances", type=int, default=10)
    ap.add_argument("--model", help="a GGUF model (default: the generated tiny one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as t, httpx.Client() as client:
        tmp = Path(t)
        model, binary = model_and_binary(tmp, args.model)
        sup = None
        try:
            procs = {"llama-orch": start_llama_orch(tmp, model, args.instances, client)}
            sup = run_supervisord(tmp, binary, model, args.instances, client)
            if sup is not None:
                procs["supervisord"] = sup[0]
            time.sleep(2)  # past start-up work
            results = measure(procs, args.seconds)
        finally:
            cli(tmp / "orch", "daemon", "stop", "--all")
            if sup is not None:
                stop_supervisord(sup[1])
                time.sleep(1)

    print(f"{args.instances} healthy instances, health checks every 1 s, {args.seconds:g} s window")
    print(f"{'supervisor':<12} {'peak RSS':>10} {'CPU':>8}")
    for name, (rss, cpu) in results.items():
        print(f"{name:<12} {rss:>8.1f}MB {cpu:>7.2f}%")
    if sup is None:
        print("supervisord skipped: not installed (pip install supervisor)")
    else:
        (rss, cpu), (s_rss, s_cpu) = results["llama-orch"], results["supervisord"]
        print(
            f"llama-orch / supervisord: RSS {rss / s_rss:.2f}x, CPU {cpu / max(s_cpu, 1e-9):.2f}x"
        )
    rss, cpu = results["llama-orch"]
    print(
        f"target: RSS <= {RSS_TARGET_MB} MB: {rss:.1f} {'OK' if rss <= RSS_TARGET_MB else 'MISSED'}; "
        f"CPU <= {CPU_TARGET_PCT:g} %: {cpu:.2f} {'OK' if cpu <= CPU_TARGET_PCT else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
