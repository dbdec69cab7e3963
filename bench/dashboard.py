"""How much the dashboard blocks its UI thread with 50 instances (10 running).

Two costs per refresh, in one run:
  snapshot  -- gathered in a worker thread (store, probes, /metrics, psutil);
               compared with `llama-orch ps --json` doing the same gathering as a CLI.
  apply     -- the only work on the UI thread: updating the table from a snapshot;
               compared with applying a 1-instance snapshot.
A refresh is "responsive" when apply stays well under a 16 ms frame.

    python bench/dashboard.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cli, free_port, write_instance  # noqa: E402

from llama_orchestrator.home import Home  # noqa: E402
from llama_orchestrator.models.tiny import write_tiny_model  # noqa: E402
from llama_orchestrator.tui.app import DashboardApp  # noqa: E402
from llama_orchestrator.tui.data import EngineSource, Snapshot  # noqa: E402


def ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1000


async def apply_times(source: EngineSource, snap: Snapshot, rounds: int) -> list[float]:
    app = DashboardApp(source, refresh=3600)
    times = []
    async with app.run_test(size=(160, 60)) as pilot:
        await pilot.pause()
        for i in range(rounds):
            for v in snap.instances:  # a changed cell in every row, as with live figures
                v.status["uptime_s"] = 100.0 + i
            t = time.perf_counter()
            app.apply(snap)
            times.append(time.perf_counter() - t)
            await pilot.pause()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        model = write_tiny_model(tmp / "tiny.gguf")
        home = tmp / "home"
        for i in range(50):
            write_instance(home, f"inst-{i:02d}", model, free_port())
        one = tmp / "one"
        write_instance(one, "solo", model, free_port())
        source = EngineSource(Home(home))
        try:
            cli(home, "up", *[f"inst-{i:02d}" for i in range(10)])
            snaps = [source.snapshot() for _ in range(args.rounds)]
            snap_t = []
            for _ in range(args.rounds):
                t = time.perf_counter()
                source.snapshot()
                snap_t.append(time.perf_counter() - t)
            ps_t = [cli(home, "ps", "--json") for _ in range(args.rounds)]
            big = asyncio.run(apply_times(source, snaps[-1], args.rounds))
            small = asyncio.run(
                apply_times(
                    EngineSource(Home(one)), EngineSource(Home(one)).snapshot(), args.rounds
                )
            )
        finally:
            cli(home, "down", "--all")
            source.close()
    print(f"dashboard, 50 instances (10 running), {args.rounds} rounds")
    print(f"  snapshot, worker thread     : median {ms(snap_t):6.1f} ms")
    print(
        f"  `llama-orch ps --json` wall : median {ms(ps_t):6.1f} ms   (snapshot/ps {ms(snap_t) / ms(ps_t):.2f}x)"
    )
    print(f"  apply on the UI thread, 50  : median {ms(big):6.1f} ms")
    print(
        f"  apply on the UI thread, 1   : median {ms(small):6.1f} ms   (ratio {ms(big) / ms(small):.1f}x;"
        " a frame is 16.7 ms)"
    )


if __name__ == "__main__":
    main()
