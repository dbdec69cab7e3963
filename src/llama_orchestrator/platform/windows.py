"""Windows: hidden console per child; graceful stop by Ctrl+C on that console.

Why Ctrl+C through a helper: llama-server on Windows installs a console
control handler that reacts to CTRL_C_EVENT only. CTRL_BREAK_EVENT (the one
Windows lets you send to a process group) falls through to the default
handler, which ends the process without llama-server's cleanup; and
CTRL_C_EVENT can only be sent to *every* process on a console, never to one
group. So each child gets a console of its own (hidden), and a stop starts a
short helper (`winctrl.py`) that attaches to that console and raises Ctrl+C
there: it reaches the child's tree and nothing else, and the CLI never
detaches from its own console. If that fails or times out, the caller falls
back to killing the tree (psutil, then TerminateProcess).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, BinaryIO

import psutil

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

#: no AF_UNIX in CPython on Windows: the control API listens on 127.0.0.1
#: and the client proves it is the user with a token only the user can read
CONTROL_TRANSPORT = "tcp"

CREATE_NEW_CONSOLE = 0x00000010
CREATE_BREAKAWAY_FROM_JOB = 0x01000000
CREATE_NO_WINDOW = 0x08000000
STARTF_USESHOWWINDOW = 0x00000001
SW_HIDE = 0


def spawn(
    argv: list[str],
    env: dict[str, str],
    cwd: Path,
    stdout: BinaryIO,
    stderr: BinaryIO,
    die_with_parent: bool = False,  # Ray runs no multi-node cluster on Windows
) -> subprocess.Popen[bytes]:
    info = subprocess.STARTUPINFO()  # type: ignore[attr-defined]
    info.dwFlags |= STARTF_USESHOWWINDOW
    info.wShowWindow = SW_HIDE
    kwargs = dict(
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        env=env,
        cwd=cwd,
        startupinfo=info,
        close_fds=True,
    )
    try:
        # Break away from the CLI's job (terminals and ssh put us in one that
        # is killed with the session) so the instance outlives the CLI.
        return subprocess.Popen(
            argv, creationflags=CREATE_NEW_CONSOLE | CREATE_BREAKAWAY_FROM_JOB, **kwargs
        )
    except PermissionError:  # the job forbids breakaway
        return subprocess.Popen(argv, creationflags=CREATE_NEW_CONSOLE, **kwargs)


def request_stop(pid: int) -> None:
    helper = Path(__file__).with_name("winctrl.py")
    # On failure the caller's deadline falls back to force_kill_group.
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(
            [sys.executable, str(helper), str(pid)],
            creationflags=CREATE_NO_WINDOW,
            timeout=10,
            check=False,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def force_kill_group(pid: int) -> None:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()  # TerminateProcess


def raise_open_files_limit() -> int:
    """Windows has no descriptor rlimit; the C runtime's stdio limit does not
    apply to sockets, which the router uses. A generous figure to cap by."""
    return 16384


def port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR on Windows would let us bind over a live listener;
        # SO_EXCLUSIVEADDRUSE makes the bind fail as it should.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)  # type: ignore[attr-defined]
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def signal_name(signum: int) -> str:
    # Windows processes end with exit codes, not signals; kept for one interface.
    return f"signal {signum}"


def try_lock(path: Path) -> IO[str] | None:
    """An exclusive lock on the first byte of `path` while the file stays open;
    Windows drops it when the process ends."""
    import msvcrt

    f = open(path, "a+")
    try:
        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
    except OSError:
        f.close()
        return None
    return f


def exit_fd(pid: int) -> int | None:
    return None  # the caller waits on the process handle in a thread instead


def interrupt_on_hangup(fd: int) -> None:
    """Not watched on Windows: its OpenSSH server ends the command's console
    with the session (and a pipe's hangup is not pollable there)."""


def on_stop_signals(callback: Callable[[str], None]) -> None:
    """Ctrl+C, Ctrl+Break and the console's close/logoff/shutdown events."""
    import signal

    def handler(signum: int, _frame: object) -> None:
        callback(signal.Signals(signum).name)

    for name in ("SIGINT", "SIGBREAK", "SIGTERM"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, handler)


def bind_control(path: Path) -> socket.socket:
    """`path` is unused: Windows listens on a free loopback port (see CONTROL_TRANSPORT)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)  # type: ignore[attr-defined]
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def connect_control(path: Path, timeout: float) -> socket.socket:
    raise OSError("Windows connects to the control API over TCP")
