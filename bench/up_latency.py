"""`llama-orch up` to healthy versus starting llama-server directly.

Both sides start the same binary on the same model and poll /health the same
way (every 50 ms); the `up` side includes the CLI's own start and goes through
the home's daemon, started once before the rounds (as after the first `up`). Also times
`llama-orch ps` with 20 instances defined (10 running) against a bare
`python -c 'import llama_orchestrator'` and against `supervisorctl status`
of a supervisord running the same 10 servers (PyPI's or Debian's
`supervisor`; skipped when it is not installed).

    python bench/up_latency.py [--rounds 7] [--model PATH]

Targets (issue 19): up overhead <= 0.2 s; ps median <= 0.25 s.
"""

from __future__ import annotations

import argparse
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
    median_ms,
    model_and_binary,
    start_supervisord,
    stop_supervisord,
    supervisord_exe,
    wait_healthy,
    write_instance,
)


def direct_round(binary: Path, model: Path, port: int, client: httpx.Client) -> float:
    argv = [
        str(binary),
        "-m",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-c",
        "512",
        "-np",
        "1",
        "-ngl",
        "0",
        "--metrics",
    ]
    t = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(client, port)
        return time.perf_counter() - t
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--model")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_s, httpx.Client(trust_env=False) as client:
        tmp = Path(tmp_s)
        model, binary = model_and_binary(tmp, args.model)
        home = tmp / "home"
        write_instance(home, "bench", model, free_port())
        direct, orch = [], []
        cli(home, "daemon", "start")
        try:
            for _ in range(args.rounds):  # interleaved, so drift hits both sides alike
                direct.append(direct_round(binary, model, free_port(), client))
                orch.append(cli(home, "up", "bench"))
                cli(home, "down", "bench")
        finally:
            cli(home, "daemon", "stop", "--all")
        d, o = median_ms(direct), median_ms(orch)
        print(f"up to healthy, {args.rounds} rounds, poll {POLL * 1000:.0f} ms, model {model.name}")
        print(f"  direct llama-server : median {d:7.1f} ms")
        print(f"  llama-orch up       : median {o:7.1f} ms")
        print(f"  overhead            : {o - d:7.1f} ms   ratio {o / d:.2f}x   (target <= 200 ms)")

        ps_home = tmp / "ps-home"
        for i in range(20):
            write_instance(ps_home, f"inst-{i:02d}", model, free_port())
        try:
            cli(ps_home, "up", *[f"inst-{i:02d}" for i in range(10)])
            ps_times = [cli(ps_home, "ps") for _ in range(args.rounds)]
            base = []
            for _ in range(args.rounds):
                t = time.perf_counter()
                subprocess.run([sys.executable, "-c", "import llama_orchestrator"], check=True)
                base.append(time.perf_counter() - t)
        finally:
            cli(ps_home, "daemon", "stop", "--all")
        p, b = median_ms(ps_times), median_ms(base)
        print("ps with 20 instances defined, 10 running")
        print(f"  python -c 'import llama_orchestrator': median {b:7.1f} ms")
        print(
            f"  llama-orch ps                        : median {p:7.1f} ms   ratio {p / b:.1f}x"
            f"   (target <= 250 ms)"
        )
        s = supervisorctl_status(tmp, binary, model, args.rounds)
        if s is None:
            print("  supervisorctl status                 : skipped (pip install supervisor)")
        else:
            print(
                f"  supervisorctl status (10 running)    : median {s:7.1f} ms   ps / it {p / s:.2f}x"
            )


def supervisorctl_status(tmp: Path, binary: Path, model: Path, rounds: int) -> float | None:
    """Median ms of `supervisorctl status` with supervisord running 10 servers."""
    if supervisord_exe() is None:
        return None
    programs = {
        f"s{i:02d}": f"{binary} -m {model} --host 127.0.0.1 --port {free_port()} -c 512 -np 1 -ngl 0"
        for i in range(10)
    }
    conf = start_supervisord(tmp / "supervisord", programs)
    ctl = str(Path(supervisord_exe() or "supervisord").with_name("supervisorctl"))
    try:
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            subprocess.run([ctl, "-c", str(conf), "status"], capture_output=True)
            times.append(time.perf_counter() - t)
        return median_ms(times)
    finally:
        stop_supervisord(conf)


if __name__ == "__main__":
    main()
