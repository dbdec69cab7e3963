"""Windows' branches, tested off Windows (issue 20): what each decides, with
the OS calls recorded or the POSIX stand-in where the decision is the same.
What cannot run anywhere but Windows is listed in docs/windows.md."""

import asyncio
import os
import signal
import subprocess
import sys

import pytest

from llama_orchestrator import platform
from llama_orchestrator.config import binary
from llama_orchestrator.platform import windows


def test_the_binary_is_llama_server_exe_and_needs_no_execute_bit(tmp_path):
    assert binary.exe_name(windows=True) == "llama-server.exe"
    assert binary.exe_name(windows=False) == "llama-server"
    plain = tmp_path / "llama-server.exe"
    plain.write_bytes(b"MZ")  # no execute bit: Windows runs it by its extension
    assert binary.usable(plain, windows=True)
    assert not binary.usable(plain, windows=False)
    assert not binary.usable(tmp_path / "absent.exe", windows=True)


def test_windows_stop_signals_reach_the_callback_by_name():
    """Ctrl+C and the console's close arrive as SIGINT/SIGBREAK/SIGTERM; the
    handler names them (SIGBREAK exists only on Windows and is skipped here)."""
    seen = []
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        windows.on_stop_signals(seen.append)
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    assert seen == ["SIGTERM", "SIGINT"]


def test_windows_has_no_exit_fd_and_a_generous_open_files_figure():
    assert windows.exit_fd(os.getpid()) is None
    assert windows.raise_open_files_limit() >= 8192
    assert windows.CONTROL_TRANSPORT == "tcp"
    assert windows.signal_name(9) == "signal 9"  # exit codes, not signals, end processes there


def test_windows_control_has_no_unix_socket_to_connect_to(tmp_path):
    with pytest.raises(OSError, match="over TCP"):
        windows.connect_control(tmp_path / "control.sock", 1)


async def test_an_exit_is_seen_without_a_pidfd_as_on_windows(monkeypatch, tmp_path):
    """Windows has no pidfd: the daemon waits for an exit in a thread instead."""
    from llama_orchestrator.daemon.effects import LiveEffects
    from llama_orchestrator.engine.process import ProcRef
    from llama_orchestrator.home import Home
    from llama_orchestrator.wire.pool import Pool

    monkeypatch.setattr(platform, "exit_fd", lambda pid: None)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    try:
        import psutil

        ref = ProcRef(proc.pid, psutil.Process(proc.pid).create_time())
        fx = LiveEffects(Home(tmp_path / "home"), Pool())
        await asyncio.wait_for(fx.watch_exit(ref), timeout=30)
        assert proc.poll() is not None
    finally:
        proc.kill()
        proc.wait()
