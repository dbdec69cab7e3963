"""The platform seam: POSIX for real, Windows' decisions with Popen recorded."""

import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from llama_orchestrator.platform import posix, windows


def test_posix_port_is_free_sees_a_listener():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.listen()
        assert not posix.port_is_free("127.0.0.1", port)
    assert posix.port_is_free("127.0.0.1", port)


def test_posix_spawn_starts_a_new_session_and_stop_reaches_the_group(tmp_path):
    with open(tmp_path / "out", "ab") as out:
        proc = posix.spawn(
            [
                sys.executable,
                "-c",
                "import subprocess,sys,time; "
                "subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)']); time.sleep(60)",
            ],
            {},
            tmp_path,
            out,
            out,
        )
    try:
        import os

        assert os.getsid(proc.pid) == proc.pid != os.getsid(0)
        p = psutil.Process(proc.pid)
        child = _wait_child(p)
        posix.request_stop(proc.pid)  # SIGTERM to the group: the grandchild too
        proc.wait(10)
        psutil.wait_procs([child], timeout=10)
        assert not child.is_running()
    finally:
        posix.force_kill_group(proc.pid)
        proc.wait(10)


def _wait_child(p: psutil.Process) -> psutil.Process:
    import time

    deadline = time.monotonic() + 10
    while not p.children():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return p.children()[0]


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


def test_windows_force_kill_takes_the_whole_tree(tmp_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess,sys,time; "
            "subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)']); "
            "time.sleep(60)",
        ]
    )
    child = _wait_child(psutil.Process(proc.pid))
    windows.force_kill_group(proc.pid)  # psutil-based: runs on any OS
    proc.wait(10)
    psutil.wait_procs([child], timeout=10)
    assert not child.is_running()
    windows.force_kill_group(proc.pid)  # a gone process is not an error


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX never signals its own group")
def test_posix_refuses_to_signal_its_own_process_group(monkeypatch):
    import os

    sent = []
    monkeypatch.setattr(os, "killpg", lambda *a: sent.append(("killpg", a)))
    monkeypatch.setattr(os, "kill", lambda *a: sent.append(("kill", a)))
    posix.request_stop(os.getpid())
    assert sent and sent[0][0] == "kill"  # our own group is never the target


def test_posix_try_lock_is_exclusive_across_processes_and_dies_with_its_holder(tmp_path):
    lock = tmp_path / "daemon.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time; from llama_orchestrator.platform import posix; "
            f"f = posix.try_lock(__import__('pathlib').Path({str(lock)!r})); "
            "print(f is not None, flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "True"
        assert posix.try_lock(lock) is None  # held by the other process
        holder.kill()  # SIGKILL: the kernel drops the lock
        holder.wait()
        mine = posix.try_lock(lock)
        assert mine is not None
        mine.close()
    finally:
        holder.kill()
        holder.wait()


def test_posix_exit_fd_becomes_readable_when_any_process_exits():
    import select

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    fd = posix.exit_fd(proc.pid)
    if fd is None:
        pytest.skip("no pidfd on this kernel")
    try:
        assert select.select([fd], [], [], 0)[0] == []
        proc.kill()
        assert select.select([fd], [], [], 5)[0] == [fd]
    finally:
        import os

        os.close(fd)
        proc.wait()


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


@pytest.mark.skipif(sys.platform == "win32", reason="signals are POSIX")
@pytest.mark.parametrize("ignores_term", [False, True])
def test_a_stopped_child_records_the_signal_that_ended_it_not_0(tmp_path, ignores_term):
    """Issue 24.6: psutil reaped the child in stop_tree, and its Popen then said 0."""
    import signal

    from llama_orchestrator.engine.process import (
        ProcRef,
        create_time_of,
        exit_code,
        stop_tree,
        track_child,
    )

    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    with open(tmp_path / "out", "ab") as out:
        argv = [sys.executable, "-c", code if ignores_term else "import time; time.sleep(60)"]
        proc = posix.spawn(argv, {}, tmp_path, out, out)
    track_child(proc)
    try:
        time.sleep(0.3)  # past the interpreter's start: the handler is in place
        graceful = stop_tree(ProcRef(proc.pid, create_time_of(proc.pid)), timeout=1.0)
        assert graceful is not ignores_term
        expected = signal.SIGKILL if ignores_term else signal.SIGTERM
        assert exit_code(proc.pid) == -expected
    finally:
        posix.force_kill_group(proc.pid)
