"""POSIX: a new session (hence process group) per child, signals to the group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import BinaryIO

__all__ = ["spawn", "request_stop", "force_kill_group", "port_is_free", "signal_name"]


def spawn(
    argv: list[str], env: dict[str, str], cwd: Path, stdout: BinaryIO, stderr: BinaryIO
) -> subprocess.Popen[bytes]:
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
    )


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
