"""Shared bits of the benchmarks: a scratch home, the tiny model, timing."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from llama_orchestrator.config.binary import find_llama_server
from llama_orchestrator.models.tiny import write_tiny_model

POLL = 0.05  # the same interval `llama-orch up` polls /health with


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(home: Path, *args: str) -> float:
    """Run `llama-orch` as a user would; return its wall time in seconds."""
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "llama_orchestrator", "--home", str(home), *args],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - t


def write_instance(
    home: Path,
    name: str,
    model: Path,
    port: int,
    server: dict | None = None,
    gpu: dict | None = None,
    **model_opts,
) -> None:
    d = home / "instances" / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(
        json.dumps(
            {
                "model": {"path": str(model), "context_size": 512, **model_opts},
                "server": {"host": "127.0.0.1", "port": port, "parallel": 1, **(server or {})},
                **({"gpu": gpu} if gpu else {}),
            }
        )
    )


def wait_healthy(client: httpx.Client, port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if client.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(POLL)
    raise RuntimeError(f"port {port} never became healthy")


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile (1..99) of `xs`."""
    return statistics.quantiles(xs, n=100)[int(q) - 1]


def median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1000


def model_and_binary(tmp: Path, model: str | None) -> tuple[Path, Path]:
    path = Path(model) if model else write_tiny_model(tmp / "tiny.gguf")
    return path, find_llama_server(None, tmp)


def env_without_home() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "LLAMA_ORCH_HOME"}


def supervisord_exe() -> str | None:
    """supervisord (PyPI `supervisor`, a benchmark-only tool), or None."""
    import shutil

    exe = shutil.which("supervisord") or str(Path(sys.executable).with_name("supervisord"))
    return exe if Path(exe).exists() else None


def start_supervisord(folder: Path, programs: dict[str, str], extra: str = "") -> Path:
    """Run supervisord (daemonized) with one [program:NAME] per command; its config path."""
    folder.mkdir()
    sections = "".join(
        f"[program:{name}]\ncommand={command}\nautorestart=true\n{extra}"
        f"stdout_logfile={folder}/{name}.out\nstderr_logfile={folder}/{name}.err\n"
        for name, command in programs.items()
    )
    conf = folder / "supervisord.conf"
    conf.write_text(
        f"""[unix_http_server]
file={folder}/s.sock
[supervisord]
logfile={folder}/supervisord.log
pidfile={folder}/supervisord.pid
[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
[supervisorctl]
serverurl=unix://{folder}/s.sock
{sections}"""
    )
    subprocess.run([supervisord_exe() or "supervisord", "-c", str(conf)], check=True)
    return conf


def stop_supervisord(conf: Path) -> None:
    ctl = Path(supervisord_exe() or "supervisord").with_name("supervisorctl")
    subprocess.run([str(ctl), "-c", str(conf), "shutdown"], capture_output=True)
