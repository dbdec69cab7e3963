"""Helpers the tests import: configs, the CLI as a process, polling."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from llama_orchestrator.errors import StateError
from llama_orchestrator.home import Home

FAKE_SERVER = Path(__file__).parent / "fakes" / "fake_server.py"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_settings(home: Home, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write a test home's llama-orch.json: `data`, with the router on a port
    of its own unless `data` names one. The default, 8080, is one machine's:
    the test workers (pytest-xdist) each run daemons at once."""
    data = json.loads(json.dumps(data or {}))
    data.setdefault("router", {}).setdefault("port", free_port())
    home.settings_path.write_text(json.dumps(data))
    return data


def overlay(cfg: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`cfg` with `overrides` laid over it, one section deep (a dict given for
    a section updates that section)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in cfg.items()}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = value
    return out


#: the library each GPU backend's ggml build puts beside llama-server
GGML_LIBRARIES = {
    "cuda": "libggml-cuda.so",
    "rocm": "libggml-hip.so",
    "vulkan": "libggml-vulkan.so",
    "sycl": "libggml-sycl.so",
    "metal": "libggml-metal.so",
}


def gpu_build(*backends: str) -> Path:
    """A llama-server that reads as a build of `backends` (all GPU backends
    when none is named): the real (CPU) one, linked into a folder beside those
    backends' ggml libraries, as the fake nvidia-smi makes cards. The tests
    pin instances to fake cards with it; the real server then runs on the CPU
    with the pin in its environment."""
    backends = backends or tuple(GGML_LIBRARIES)
    import hashlib
    import tempfile

    from llama_orchestrator.config.binary import exe_name, find_llama_server

    real = find_llama_server(None, Path("/nonexistent"))
    tag = hashlib.sha1(str(real).encode()).hexdigest()[:10]
    folder = Path(tempfile.gettempdir()) / f"llama-orch-{'-'.join(backends)}-build-{tag}"
    exe = folder / exe_name()
    if not exe.exists():
        folder.mkdir(parents=True, exist_ok=True)
        for backend in backends:
            (folder / GGML_LIBRARIES[backend]).touch()
        with contextlib.suppress(FileExistsError):  # another test worker made it
            exe.symlink_to(real)
    return exe


def write_config(home: Home, name: str, model_path: Path | str, **overrides: Any) -> Path:
    """Write instances/NAME/config.json: the tiny model, a free port, fast
    checks; a GPU backend runs `gpu_build(backend)` unless `binary` is named."""
    cfg: dict[str, Any] = {
        "model": {"path": str(model_path), "context_size": 512},
        "server": {"host": "127.0.0.1", "port": free_port(), "parallel": 2},
        "stop_timeout": 5,
    }
    cfg = overlay(cfg, overrides)
    backend = cfg.get("gpu", {}).get("backend", "cpu")
    if backend in GGML_LIBRARIES and "binary" not in cfg:
        cfg["binary"] = str(gpu_build(backend))
    path = home.config_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=2))
    return path


def run_cli(
    home: Home | Path,
    *args: str,
    timeout: float = 120,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the real `llama-orch` CLI in a separate process."""
    root = home.root if isinstance(home, Home) else home
    return subprocess.run(
        [sys.executable, "-m", "llama_orchestrator", "--home", str(root), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll `predicate` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def write_unloadable_model(path: Path) -> Path:
    """A whole, readable GGUF of an architecture llama-server does not know: every
    check of ours passes it, and llama-server exits with a model loading error."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "no-such-arch")
    w.add_tensor("t.weight", np.zeros(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def fill(store: Any, *others: Any) -> None:
    """Let the database grow no more (SQLite then answers as on a full disk;
    the limit is one connection's), and fill what room is left with events."""
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    for s in (store, *others):
        s._conn.execute(f"PRAGMA max_page_count = {pages}")
    for _ in range(10_000):
        try:
            store.add_event(None, "filler", "x" * 200)
        except StateError:  # DiskFull, without the daemon's memory
            return
        if store.unsaved:
            return
    raise AssertionError("the database never filled")


def make_room(*stores: Any) -> None:
    for s in stores:
        s._conn.execute("PRAGMA max_page_count = 1000000")
