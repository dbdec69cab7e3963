"""The daemon's side of plan tasks that run on a peer (`"host": "rig2"`; the
how and why are `plans.hosts`'s): one ssh child per attempt, whose process
the plan runner records like a shell task's, so that a daemon started after
a crash ends the one a dead daemon left (and follows the peer's run again).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llama_orchestrator.config.settings import PeerSettings
from llama_orchestrator.errors import OrchError
from llama_orchestrator.hosts import ssh
from llama_orchestrator.plans.hosts import Reply, one_task_plan, origin_of
from llama_orchestrator.plans.spec import Task

__all__ = ["HostTasks", "SLOTS"]

log = logging.getLogger("llama_orchestrator.daemon")

#: tasks this daemon runs on one peer at once (the peer's daemon bounds them
#: again by its own shell slots and GPU leases); each holds one ssh connection
SLOTS = 8
#: how long asking a peer to cancel its run may take
CANCEL_TIMEOUT_S = 20.0


class HostTasks:
    def __init__(self, peers: list[PeerSettings], machine: str | None = None) -> None:
        #: the peers tasks may run on: those this daemon can reach by ssh
        self.peers = {p.name: p for p in peers if p.ssh}
        self.machine = machine or socket.gethostname()
        #: set at daemon stop: the peers' runs go on, the next daemon follows them
        self.closing = False

    def names(self) -> set[str]:
        return set(self.peers)

    def target(self, host: str) -> ssh.SshTarget:
        peer = self.peers.get(host)
        if peer is None or peer.ssh is None:
            raise OrchError(f"'{host}' is no peer with an ssh address in llama-orch.json.")
        from llama_orchestrator.hosts.contexts import resolve

        found = resolve(peer.ssh)  # an ssh:// address, or a context's name
        if found is None:
            raise OrchError(f"Peer '{host}' has ssh \"default\", which is this machine.")
        return dataclasses.replace(found, label=host)

    async def run(
        self,
        run_id: str,
        task: Task,
        argv: list[str],
        out_path: Path,
        err_path: Path,
        started: Callable[[int], object],
    ) -> dict[str, Any]:
        """One attempt of `task` on its host: record fields, with "error"
        when it failed. `started(pid)` is told the ssh child's pid."""
        assert task.host is not None
        try:
            target = self.target(task.host)
            origin = origin_of(run_id, task.id, self.machine)
            proc = await ssh.start(target, ["system", "task", "--origin", origin])
        except OrchError as exc:
            return {"error": exc.message}
        started(proc.pid)
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        proc.stdin.write(one_task_plan(task, argv, origin).encode())
        proc.stdin.close()
        reply = Reply()
        stderr = asyncio.ensure_future(proc.stderr.read())
        try:
            async for line in proc.stdout:
                reply.feed(line.decode("utf-8", "replace"))
            rc = await proc.wait()
        except asyncio.CancelledError:  # timed out, cancelled, or the daemon stops
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(self._cancelled(target, reply.run, proc))
            raise
        before, said, ran = ssh.split_marked((await stderr).decode("utf-8", "replace"))
        problem = ssh.ssh_failure(target, rc, before, ran)
        if problem is not None:
            return {"error": problem.message}
        error = reply.error(task.host, said, rc)
        if reply.end is None:
            assert error is not None
            return {"error": error}
        out_path.write_text(str(reply.end.get("output") or ""), encoding="utf-8")
        err_path.write_text(str(reply.end.get("stderr") or ""), encoding="utf-8")
        where = f"{task.host} (run {reply.run})"  # plan status: where to look there
        return {
            "pid": None,
            "create_time": None,
            "instance": where,
            **({"error": error} if error else {}),
        }

    async def _cancelled(
        self, target: ssh.SshTarget, run: str | None, proc: asyncio.subprocess.Process
    ) -> None:
        """The peer's run is cancelled too, unless this daemon is only stopping."""
        await proc.wait()
        if self.closing or run is None:
            return
        try:
            await asyncio.wait_for(ssh.call(target, ["plan", "cancel", run]), CANCEL_TIMEOUT_S)
        except (OrchError, asyncio.TimeoutError) as exc:
            log.warning(f"could not cancel plan run {run} on {target.name}: {exc}")
