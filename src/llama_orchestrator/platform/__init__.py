"""OS-specific process code behind one seam (STYLE 4).

`posix` and `windows` export the same functions; nothing else in the package
imports `signal`, calls `os.kill` or sets process-creation flags.

    spawn(argv, env, cwd, stdout, stderr) -> Popen   detached, own process group
    request_stop(pid)                                 the graceful stop signal
    force_kill_group(pid)                             kill what is left of the group
    port_is_free(host, port) -> bool                  nothing listens there
    signal_name(signum) -> str                        SIGKILL, SIGSEGV, ...
"""

from __future__ import annotations

import os

if os.name == "nt":
    from llama_orchestrator.platform.windows import (
        force_kill_group,
        port_is_free,
        request_stop,
        signal_name,
        spawn,
    )
else:
    from llama_orchestrator.platform.posix import (
        force_kill_group,
        port_is_free,
        request_stop,
        signal_name,
        spawn,
    )

__all__ = ["spawn", "request_stop", "force_kill_group", "port_is_free", "signal_name"]
