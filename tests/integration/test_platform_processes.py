"""The platform seam on real processes: sessions and groups, a stop that
reaches the whole tree, locks across processes, pidfds, exit codes."""

import subprocess
import sys
import time

import psutil
import pytest

from llama_orchestrator.platform import posix, windows


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
