"""OS-specific process code behind one seam (STYLE 4).

`posix` and `windows` export the same functions; nothing else in the package
imports `signal`, calls `os.kill` or sets process-creation flags.

    spawn(argv, env, cwd, stdout, stderr) -> Popen   detached, own process group
    request_stop(pid)                                 the graceful stop signal
    force_kill_group(pid)                             kill what is left of the group
    port_is_free(host, port) -> bool                  nothing listens there
    signal_name(signum) -> str                        SIGKILL, SIGSEGV, ...
    try_lock(path) -> file | None                     an exclusive lock held while open
    exit_fd(pid) -> int | None                        readable when pid exits (Linux pidfd)
    on_stop_signals(callback)                         SIGTERM/SIGINT/... -> callback(name)
    interrupt_on_hangup(fd)                           SIGINT to us once fd's reader is gone
    CONTROL_TRANSPORT, bind_control, connect_control  the daemon's control socket
"""

from __future__ import annotations

import os

if os.name == "nt":
    from llama_orchestrator.platform.windows import (
        CONTROL_TRANSPORT,
        bind_control,
        connect_control,
        exit_fd,
        force_kill_group,
        interrupt_on_hangup,
        on_stop_signals,
        port_is_free,
        raise_open_files_limit,
        request_stop,
        signal_name,
        spawn,
        try_lock,
    )
else:
    from llama_orchestrator.platform.posix import (
        CONTROL_TRANSPORT,
        bind_control,
        connect_control,
        exit_fd,
        force_kill_group,
        interrupt_on_hangup,
        on_stop_signals,
        port_is_free,
        raise_open_files_limit,
        request_stop,
        signal_name,
        spawn,
        try_lock,
    )

__all__ = [
    "CONTROL_TRANSPORT",
    "bind_control",
    "connect_control",
    "exit_fd",
    "force_kill_group",
    "interrupt_on_hangup",
    "on_stop_signals",
    "port_is_free",
    "raise_open_files_limit",
    "request_stop",
    "signal_name",
    "spawn",
    "try_lock",
]
