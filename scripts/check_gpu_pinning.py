"""GPU pinning on a real NVIDIA machine, end to end, nothing faked: instances
pinned to a card, on `auto`, on the CPU and on a card that is not there are
started through `llama-orch up`, and nvidia-smi (not our own code) says which
processes hold memory on which card.

    LLAMA_SERVER_BIN=/path/to/cuda/llama-server python scripts/check_gpu_pinning.py

Needs a CUDA build of llama-server (the `server` extra builds for the CPU).
Prints what it saw and exits 1 when a check fails. The tests prove pinning
through the child's environment; this proves the environment does what we
think on real hardware.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from llama_orchestrator.models.tiny import write_tiny_model

failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"  [{'ok' if ok else 'FAILED'}] {what}")
    if not ok:
        failures.append(what)


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llama_orchestrator", "--home", str(home), *args],
        capture_output=True,
        text=True,
    )


def smi(query: str) -> list[list[str]]:
    out = subprocess.run(
        ["nvidia-smi", f"--query-{query}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]


def gpu_pids() -> dict[int, int]:
    """pid -> MiB, as nvidia-smi reports compute processes."""
    return {int(row[0]): int(row[1]) for row in smi("compute-apps=pid,used_memory")}


def write(home: Path, name: str, model: Path, port: int, gpu: dict) -> None:
    d = home / "instances" / name
    d.mkdir(parents=True)
    config = {
        "model": {"path": str(model), "context_size": 1024},
        "server": {"host": "127.0.0.1", "port": port},
        "gpu": gpu,
    }
    (d / "config.json").write_text(json.dumps(config))


def main() -> int:
    print("nvidia-smi:", smi("gpu=index,name,memory.total,memory.used"))
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        home = tmp / "home"
        model = write_tiny_model(tmp / "m.gguf", n_layer=4, n_embd=256, n_head=8, n_ff=1024)
        cases = {
            "pinned": {"backend": "cuda", "device_id": 0, "layers": -1},
            "auto": {"backend": "cuda", "device_id": "auto", "layers": -1},
            "cpu": {"backend": "cpu"},
            "absent": {"backend": "cuda", "device_id": 7, "layers": -1},
        }
        for i, (name, gpu) in enumerate(cases.items()):
            write(home, name, model, 18400 + i, gpu)
        gpus = cli(home, "gpus", "--json")
        print("llama-orch gpus --json:", gpus.stdout.strip() or gpus.stderr.strip())
        check(gpus.returncode == 0 and "NVIDIA" in gpus.stdout, "`gpus` lists the card")
        try:
            up = cli(home, "up", "pinned", "auto", "cpu", "--no-daemon")
            print("up pinned auto cpu ->", up.returncode, up.stdout.strip(), up.stderr.strip())
            check(up.returncode == 0, "up of the pinned, auto and cpu instances")
            time.sleep(1)
            rows = {r["name"]: r for r in json.loads(cli(home, "ps", "--json").stdout)}
            apps = gpu_pids()
            print("ps:\n" + cli(home, "ps").stdout)
            print("nvidia-smi compute apps (pid: MiB):", apps)
            for name in ("pinned", "auto", "cpu"):
                pid = rows[name]["pid"]
                env = psutil.Process(pid).environ() if pid else {}
                print(
                    f"  {name}: pid {pid} CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES')!r}"
                    f" on GPU: {apps.get(pid)} MiB"
                )
            check(rows["pinned"]["pid"] in apps, "the instance pinned to GPU 0 holds memory on it")
            check(rows["auto"]["pid"] in apps, "the `auto` instance was put on the card")
            check(rows["cpu"]["pid"] not in apps, "the cpu instance holds no GPU memory")
            absent = cli(home, "up", "absent", "--no-daemon", "--timeout", "60")
            print("up absent ->", absent.returncode, absent.stdout.strip(), absent.stderr.strip())
            check(absent.returncode != 0, "pinning to a card that is not there does not start")
            check("Traceback" not in absent.stderr, "... and says so without a traceback")
            print("describe pinned:\n" + cli(home, "describe", "pinned").stdout)
        finally:
            down = cli(home, "down", "--all")
            print("down --all ->", down.returncode)
        time.sleep(1)
        left = set(gpu_pids())
        check(not left, f"nothing left on the GPU after down --all ({left or 'empty'})")
    print("FAILED: " + "; ".join(failures) if failures else "all GPU pinning checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
