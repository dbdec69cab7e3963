"""`llama-orch cluster start --block`: this machine's Ray in the
foreground, and a node kept in its cluster.

A node cut off from its head for longer than Ray's health checks allow
(about a minute) is called dead by the head, and its Ray ends when the link
is back; so does a Ray that crashed. A node (not the head) then starts its
Ray anew: a new node of the same name, where the daemon places its pinned
instances again. A signal to this process ends it and its Ray.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

__all__ = ["run_blocking", "REJOIN_PAUSE"]

#: seconds between a node's Ray ending and its start anew
REJOIN_PAUSE = 1.0


def run_blocking(
    argv: list[str], env: dict[str, str], node: bool, say: Callable[[str], None]
) -> int:
    """Run `ray start ... --block` until a signal ends us; a node's Ray
    that ends by itself is started again. The head's exit code otherwise."""
    while True:
        code = subprocess.call(argv, env=env)
        if not node:
            return code
        say(f"Ray ended (exit {code}); rejoining the cluster")
        time.sleep(REJOIN_PAUSE)
