"""Boot of five instances with `loads.max_concurrent` 1 versus unlimited.

Each round writes five instances, each on its own model file (five models,
as on a rig: one file per card), drops them from the page cache where the
machine allows (root on Linux: `echo 1 > /proc/sys/vm/drop_caches`), and
times `llama-orch up --all` until every one is healthy, once with one load
at a time and once with all at once, alternating, in the same run.

    python bench/loads.py [--rounds 3] [--layers 8] [--embd 768] [--model PATH]

`--model` loads that file five times instead (e.g. a real gemma-3-270m GGUF);
by default the models are generated (random weights, the size set by --layers
and --embd). On a riser rig the limit wins: five loads at once share one disk
and one x1 bus, each then slower than its start_period allows. On a machine
with a fast disk and the models in the page cache, loading is bound by the CPU
copying tensors, and the ratio says how much the queue costs there.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cli, free_port, write_instance  # noqa: E402

from llama_orchestrator.models.tiny import write_tiny_model  # noqa: E402

N = 5


def drop_caches() -> bool:
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def boot(home: Path, limit: int) -> float:
    """Seconds from `up --all` until all five are healthy, then down them."""
    (home / "llama-orch.json").write_text(json.dumps({"loads": {"max_concurrent": limit}}))
    cli(home, "daemon", "stop")  # the daemon reads its settings at start
    cli(home, "daemon", "start")
    drop_caches()
    seconds = cli(home, "up", "--all", "--timeout", "600")
    cli(home, "down", "--all")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--embd", type=int, default=768)
    ap.add_argument("--model", help="a GGUF file to load five times (else generated ones)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-loads-"))
    home = tmp / "home"
    try:
        models = []
        for i in range(N):
            if args.model:
                models.append(Path(args.model))
                continue
            models.append(
                write_tiny_model(
                    tmp / f"m{i}.gguf",
                    seed=i,
                    n_layer=args.layers,
                    n_embd=args.embd,
                    n_head=8,
                    n_head_kv=4,
                    n_ff=4 * args.embd,
                )
            )
        size = sum(m.stat().st_size for m in models) / 2**20
        for i, model in enumerate(models):
            write_instance(home, f"i{i}", model, free_port())
        cached = "dropped before each boot" if drop_caches() else "not dropped (not root)"
        print(f"{N} instances, {size:.0f} MiB of models in all; page cache {cached}")
        times: dict[int, list[float]] = {1: [], 0: []}
        cli(home, "daemon", "start")
        for r in range(args.rounds):
            for limit in (1, 0) if r % 2 == 0 else (0, 1):
                times[limit].append(boot(home, limit))
        one, unlimited = statistics.median(times[1]), statistics.median(times[0])
        print(f"max_concurrent 1:         median {one:6.2f} s  {[f'{x:.2f}' for x in times[1]]}")
        print(
            f"max_concurrent unlimited: median {unlimited:6.2f} s  {[f'{x:.2f}' for x in times[0]]}"
        )
        print(f"ratio (one at a time / all at once): {one / unlimited:.2f}")
    finally:
        cli(home, "daemon", "stop", "--all")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
