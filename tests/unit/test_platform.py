"""The platform seam without processes: sockets, locks by hand, and
Windows' decisions with Popen recorded. What runs real process trees is
`tests/integration/test_platform_processes.py`."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llama_orchestrator.platform import posix, windows


def test_posix_port_is_free_sees_a_listener():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.listen()
        assert not posix.port_is_free("127.0.0.1", port)
    assert posix.port_is_free("127.0.0.1", port)


class _Recorder:
    def __init__(self, fail_first: type[Exception] | None = None):
        self.calls: list[dict] = []
        self.fail_first = fail_first

    def __call__(self, argv, **kwargs):
        self.calls.append({"argv": argv, **kwargs})
        if self.fail_first and len(self.calls) == 1:
            raise self.fail_first("denied")
        return "proc"


class _StartupInfo:
    dwFlags = 0
    wShowWindow = 1


def test_windows_spawn_uses_a_hidden_console_and_breaks_away_from_the_job(monkeypatch, tmp_path):
    rec = _Recorder()
    monkeypatch.setattr(subprocess, "STARTUPINFO", _StartupInfo, raising=False)
    monkeypatch.setattr(subprocess, "Popen", rec)
    assert windows.spawn(["llama-server.exe"], {"A": "1"}, tmp_path, None, None) == "proc"
    (call,) = rec.calls
    assert call["creationflags"] == windows.CREATE_NEW_CONSOLE | windows.CREATE_BREAKAWAY_FROM_JOB
    assert call["startupinfo"].wShowWindow == windows.SW_HIDE
    assert call["stdin"] == subprocess.DEVNULL and call["env"] == {"A": "1"}


def test_windows_spawn_falls_back_when_the_job_forbids_breakaway(monkeypatch, tmp_path):
    rec = _Recorder(fail_first=PermissionError)
    monkeypatch.setattr(subprocess, "STARTUPINFO", _StartupInfo, raising=False)
    monkeypatch.setattr(subprocess, "Popen", rec)
    windows.spawn(["llama-server.exe"], {}, tmp_path, None, None)
    assert [c["creationflags"] for c in rec.calls] == [
        windows.CREATE_NEW_CONSOLE | windows.CREATE_BREAKAWAY_FROM_JOB,
        windows.CREATE_NEW_CONSOLE,
    ]


def test_windows_graceful_stop_runs_the_ctrl_c_helper(monkeypatch):
    seen = []
    monkeypatch.setattr(subprocess, "run", lambda argv, **kw: seen.append((argv, kw)))
    windows.request_stop(4242)
    ((argv, kw),) = seen
    assert argv[0] == sys.executable and Path(argv[1]).name == "winctrl.py" and argv[2] == "4242"
    assert kw["creationflags"] == windows.CREATE_NO_WINDOW and kw["timeout"] == 10
    assert (Path(windows.__file__).parent / "winctrl.py").is_file()


def test_windows_graceful_stop_never_raises(monkeypatch):
    def boom(*a, **k):
        raise subprocess.TimeoutExpired("x", 10)

    monkeypatch.setattr(subprocess, "run", boom)
    windows.request_stop(1)  # the caller's deadline takes over


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX never signals its own group")
def test_posix_refuses_to_signal_its_own_process_group(monkeypatch):
    import os

    sent = []
    monkeypatch.setattr(os, "killpg", lambda *a: sent.append(("killpg", a)))
    monkeypatch.setattr(os, "kill", lambda *a: sent.append(("kill", a)))
    posix.request_stop(os.getpid())
    assert sent and sent[0][0] == "kill"  # our own group is never the target


@pytest.mark.parametrize("long", [False, True])
def test_posix_control_socket_is_private_and_works_with_long_paths(tmp_path, long):
    import os
    import stat

    folder = tmp_path / ("x" * 120 if long else "s")
    folder.mkdir()
    path = folder / "daemon.sock"
    server = posix.bind_control(path)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert (len(os.fsencode(path)) > 100) == long  # past sun_path's limit when long
        client = posix.connect_control(path, 2)
        conn, _ = server.accept()
        client.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        client.close()
        conn.close()
        assert os.path.exists(path)
    finally:
        server.close()
