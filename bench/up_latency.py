"""`llama-orch up` to healthy versus starting llama-server directly.

Both sides start the same binary on the same model and poll /health the same
way (every 50 ms); the `up` side includes the CLI's own start and goes through
the home's daemon, started once before the rounds (as after the first `up`). Also times
`llama-orch ps` with 20 instances defined (10 running) against a bare
`python -c 'import llama_orchestrator'`.

    python bench/up_latency.py [--rounds 7] [--model PATH]

Targets (issue 2): up overhead <= 0.3 s; ps median <= 0.4 s.
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
from _common import POLL, cli, free_port, median_ms, model_and_binary, wait_healthy, write_instance  # noqa: E402


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
        print(f"  overhead            : {o - d:7.1f} ms   ratio {o / d:.2f}x   (target <= 300 ms)")

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
            f"   (target <= 400 ms)"
        )


if __name__ == "__main__":
    main()
