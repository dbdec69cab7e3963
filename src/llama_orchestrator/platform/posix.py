"""POSIX: a new session (hence process group) per child, signals to the group."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, BinaryIO

__all__ = [
    "spawn",
    "request_stop",
    "force_kill_group",
    "port_is_free",
    "signal_name",
    "try_lock",
    "exit_fd",
    "on_stop_signals",
    "CONTROL_TRANSPORT",
    "bind_control",
    "connect_control",
]

#: the daemon's control API listens on a unix socket (mode 0600)
CONTROL_TRANSPORT = "unix"
_SUN_PATH_MAX = 100  # sockaddr_un.sun_path is 104 (macOS) or 108 (Linux) bytes


def spawn(
    argv: list[str],
    env: dict[str, str],
    cwd: Path,
    stdout: BinaryIO,
    stderr: BinaryIO,
    die_with_parent: bool = False,
) -> subprocess.Popen[bytes]:
    """`die_with_parent`: the child is killed when the thread that spawned it
    ends (Linux's PR_SET_PDEATHSIG), as a cluster node's server must be when
    Ray kills the actor that runs it; spawn from a thread that lives as long
    as its process does."""
    # A new session detaches the child from our terminal (no SIGINT/SIGHUP
    # from it) and makes it a group leader, so a stop reaches its whole tree.
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        env=env,
        cwd=cwd,
        start_new_session=True,
        close_fds=True,
        preexec_fn=_die_with_parent if die_with_parent and sys.platform == "linux" else None,
    )


def _die_with_parent() -> None:
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _group_of(pid: int) -> int | None:
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return None
    # Never signal our own group: that would be the CLI (or the test runner).
    return None if pgid == os.getpgrp() else pgid


def _signal(pid: int, sig: signal.Signals) -> None:
    pgid = _group_of(pid)
    try:
        if pgid is not None:
            os.killpg(pgid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def request_stop(pid: int) -> None:
    """SIGTERM to the process group: llama-server finishes and exits 0."""
    _signal(pid, signal.SIGTERM)


def force_kill_group(pid: int) -> None:
    _signal(pid, signal.SIGKILL)


#: macOS refuses a soft limit above OPEN_MAX, whatever the hard one says
_OPEN_MAX = 10240


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (as nginx's
    worker_rlimit_nofile does); the soft limit now."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if sys.platform == "darwin":
        want = min(want, _OPEN_MAX)
    if want > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass  # kept as it was: the caps below are taken from it
    return int(soft)


def port_is_free(host: str, port: int) -> bool:
    """True when a listener could bind host:port now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR ignores sockets in TIME_WAIT (a server just stopped)
        # but still fails for a live listener, which is what we ask about.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def try_lock(path: Path) -> IO[str] | None:
    """An exclusive lock on `path`, held while the returned file stays open
    (the kernel drops it when the process dies, even by SIGKILL); None when
    another process holds it."""
    import fcntl

    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f


def exit_fd(pid: int) -> int | None:
    """A file descriptor that becomes readable when `pid` exits (Linux pidfd),
    for any process, not only our children; None where there is none."""
    if not hasattr(os, "pidfd_open"):
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def interrupt_on_hangup(fd: int) -> None:
    """When the reader of `fd` goes away (ssh's client was stopped: sshd
    closes the pipe a command run without a terminal writes to), SIGINT to
    this process, as ^C would be: a `logs -f` there must not wait for its
    next line to find out. A thread blocked in poll(2), no cost meanwhile."""
    import select
    import threading

    def watch() -> None:
        poller = select.poll()
        poller.register(fd, 0)  # POLLERR and POLLHUP are reported whatever the mask
        while True:
            events = poller.poll()
            if any(e & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, e in events):
                os.kill(os.getpid(), signal.SIGINT)
                return

    threading.Thread(target=watch, name="hangup", daemon=True).start()


def on_stop_signals(callback: Callable[[str], None]) -> None:
    """Call `callback(signal name)` on SIGTERM, SIGINT and SIGHUP (main thread)."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: callback(signal.Signals(signum).name))


def _short(path: Path) -> tuple[str, int | None]:
    """An address for `path` that fits sun_path: on Linux a long path is
    reached through /proc/self/fd/N of its folder (N kept open by the caller)."""
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        return str(path), None
    if not os.path.isdir("/proc/self/fd"):
        raise OSError(f"the path {path} is too long for a unix socket")
    fd = os.open(path.parent, os.O_RDONLY)
    return f"/proc/self/fd/{fd}/{path.name}", fd


def bind_control(path: Path) -> socket.socket:
    """A listening unix socket at `path`, readable and writable by its owner only."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a socket left by a daemon that was killed
    address, fd = _short(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # created 0600: no window where others may connect
    try:
        sock.bind(address)
    finally:
        os.umask(old)
        if fd is not None:
            os.close(fd)
    sock.listen(128)
    return sock


def connect_control(path: Path, timeout: float) -> socket.socket:
    address, fd = _short(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    finally:
        if fd is not None:
            os.close(fd)
    return sock
