"""What running work as a plan costs: a plan of N independent short llm tasks
on two instances (`parallel: 4` each) against the same N chat requests sent
straight to the two instances by a client at concurrency 8, in one run.

    python bench/plans.py [--tasks 300] [--tokens 8] [--model PATH]

Target (issue 5): plan wall time <= 1.25x the direct run. Also printed: the
added wall time per task (ms), and the daemon's own time per task from the
run's records (from "ready with a free slot" to "running").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).parent))
from _common import cli, free_port, model_and_binary, write_instance  # noqa: E402


def body(i: int, tokens: int) -> dict:
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": f"Say {i}"}],
        "max_tokens": tokens,
    }


async def direct(urls: list[str], n: int, tokens: int, conc: int = 8) -> float:
    todo = iter(range(n))
    async with aiohttp.ClientSession() as session:

        async def worker(k: int) -> None:
            for i in todo:
                url = urls[(i + k) % len(urls)]
                async with session.post(url, json=body(i, tokens)) as r:
                    r.raise_for_status()
                    await r.read()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(conc)))
        return time.perf_counter() - t0


def run_plan(home: Path, folder: Path, n: int, tokens: int) -> tuple[float, dict]:
    tasks = [
        {"id": f"t{i}", "kind": "llm", "model": "tiny", "prompt": f"Say {i}", "max_tokens": tokens}
        for i in range(n)
    ]
    path = folder / "bench-plan.json"
    path.write_text(json.dumps({"name": "bench", "tasks": tasks}))
    out = subprocess.run(
        [sys.executable, "-m", "llama_orchestrator", "--home", str(home), "plan", "run", str(path)],
        check=True,
        capture_output=True,
        text=True,
    )
    run_id = out.stdout.split()[0]
    while True:
        status = subprocess.run(
            [sys.executable, "-m", "llama_orchestrator", "--home", str(home), "plan", "status",
             run_id, "--json"],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        data = json.loads(status.stdout)
        if data["state"] != "running":
            break
        time.sleep(0.2)
    assert data["state"] == "completed", data["counts"]
    return data["elapsed_s"], data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=300)
    ap.add_argument("--tokens", type=int, default=8, help="max_tokens per task")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", help="a GGUF model (default: the generated tiny one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        model, _ = model_and_binary(tmp, args.model)
        home = tmp / "home"
        ports = [free_port(), free_port()]
        for name, port in zip(("a", "b"), ports, strict=True):
            write_instance(
                home, name, model, port, {"parallel": 4}, alias="tiny", threads=1,
                context_size=4096,
            )  # fmt: skip
        (home / "llama-orch.json").write_text(json.dumps({"router": {"port": free_port()}}))
        cli(home, "up", "a", "b")
        urls = [f"http://127.0.0.1:{p}/v1/chat/completions" for p in ports]
        try:
            asyncio.run(direct(urls, 40, args.tokens))  # warm both servers
            direct_s, plan_s = [], []
            for _ in range(args.rounds):  # interleaved
                direct_s.append(asyncio.run(direct(urls, args.tasks, args.tokens)))
                wall, data = run_plan(home, tmp, args.tasks, args.tokens)
                plan_s.append(wall)
        finally:
            cli(home, "daemon", "stop", "--all")
    d, p = statistics.median(direct_s), statistics.median(plan_s)
    per_task = (p - d) / args.tasks * 1000
    print(
        f"{args.tasks} llm tasks (max_tokens {args.tokens}) on 2 instances x parallel 4, "
        f"median of {args.rounds}"
    )
    print(f"  direct client, concurrency 8: {d:.2f} s")
    print(f"  plan (submit -> last task done): {p:.2f} s")
    print(f"  ratio {p / d:.2f}x; added wall time per task {per_task:.2f} ms")
    print(f"target: plan <= 1.25x direct: {p / d:.2f}x {'OK' if p / d <= 1.25 else 'MISSED'}")


if __name__ == "__main__":
    main()
