"""The product's main path as a user takes it, on whatever OS runs it: the CI
workflow's Windows job runs it against a Windows build of llama-server (our
own machines are Linux; `.ci/run` covers those with the whole test suite).

    LLAMA_SERVER_BIN=C:\\llama\\llama-server.exe python scripts/smoke.py

A tiny model, a fresh home, then `init`, `up` (the daemon starts), `ps`, a
completion, a graceful `down` (Ctrl+C through the console helper on Windows,
SIGTERM elsewhere: the `stopped` event says whether it was enough), `daemon
status` and `stop`, and both Windows service managers' `--dry-run`. Prints
each step; exits 1 when a check fails, with no llama-server left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from llama_orchestrator.models.tiny import write_tiny_model

failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(("ok    " if ok else "FAIL  ") + what, flush=True)
    if not ok:
        failures.append(what)


def cli(home: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LLAMA_ORCH_HOME": str(home), "NO_COLOR": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "llama_orchestrator", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    print(f"$ llama-orch {' '.join(args)}  -> exit {r.returncode}", flush=True)
    for line in (r.stdout + r.stderr).strip().splitlines()[-8:]:
        print(f"    {line}", flush=True)
    return r


def servers() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["name"]):
        if (p.info["name"] or "").lower().startswith("llama-server"):
            found.append(p)
    return found


def events(home: Path) -> list[dict[str, Any]]:
    r = cli(home, "events", "smoke", "--json")
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def main() -> int:
    before = {p.pid for p in servers()}
    with tempfile.TemporaryDirectory(prefix="llama-orch-smoke-") as tmp:
        root = Path(tmp)
        model = write_tiny_model(root / "tiny.gguf")
        home = root / "home"
        try:
            r = cli(home, "init", "smoke", "--model", str(model), "--ctx", "256")
            check(r.returncode == 0, "init writes the instance")
            r = cli(home, "up", "smoke")
            check(r.returncode == 0 and "smoke healthy" in r.stdout, "up: healthy")
            rows = json.loads(cli(home, "ps", "--json").stdout or "[]")
            row = next((x for x in rows if x["name"] == "smoke"), {})
            check(row.get("state") == "healthy" and bool(row.get("pid")), "ps: healthy, a pid")
            if row.get("port"):
                reply = httpx.post(
                    f"http://127.0.0.1:{row['port']}/completion",
                    json={"prompt": "hi", "n_predict": 4, "ignore_eos": True},
                    timeout=60,
                )
                check(reply.status_code == 200, "llama-server answers a completion")
            r = cli(home, "down", "smoke")
            check(r.returncode == 0 and "smoke stopped" in r.stdout, "down: stopped")
            stops = [e for e in events(home) if e.get("kind") == "stopped"]
            graceful = bool(stops) and stops[-1].get("data", {}).get("graceful") is True
            check(graceful, "the stop was graceful (not killed after stop_timeout)")
            if row.get("pid"):
                check(not psutil.pid_exists(row["pid"]), "its process is gone")
            r = cli(home, "daemon", "status", "--json")
            check(r.returncode == 0 and json.loads(r.stdout).get("running"), "daemon status")
            r = cli(home, "daemon", "stop")
            check(r.returncode == 0, "daemon stop")
            for manager in ("schtasks", "nssm"):
                r = cli(home, "service", "install", "--manager", manager, "--dry-run")
                check(r.returncode == 0, f"service install --manager {manager} --dry-run")
        finally:
            cli(home, "down", "--all", "--timeout", "5")
            cli(home, "daemon", "stop")
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and {p.pid for p in servers()} - before:
                time.sleep(0.2)
            check(not ({p.pid for p in servers()} - before), "no llama-server is left")
    print("\nall checks passed" if not failures else f"\n{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
