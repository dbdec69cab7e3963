"""Plan tasks that run on another machine: a `shell` or `script` task with
`"host": "rig2"` runs there through that peer's own daemon, never a shell
string. Pure parts; the daemon's side is `daemon.hosttasks`, the far side
`llama-orch system task` (`plans.ops.for_peer`).

How: this daemon starts `ssh … llama-orch --home H system task --origin O`
(over the system's OpenSSH, as `--host ssh://` does) and writes the task as
a one-task plan on its stdin. The peer's daemon runs it like any of its own
plans (its shell slots, its GPU leases for a script task, its timeout) and
`system task` prints two JSON lines: the peer's run id at once, and the
run's end (state, error, output, stderr) when it ends. The output and exit
status come back into this plan like a local task's.

Why through the peer's daemon over ssh, not the router: the router port
serves what a client may ask and nothing more (no control verbs there), and
ssh already carries the operator's keys and known_hosts checking.

The origin names this run's task (`FROM_PEER`); it is the peer's plan name,
so that after this daemon was killed the requeued task follows the peer's
run still going (or already done) rather than running the command twice.
"""

from __future__ import annotations

import json
from typing import Any

from llama_orchestrator.plans.spec import Task

__all__ = ["FROM_PEER", "origin_of", "one_task_plan", "Reply"]

#: the plan name, on the peer, of a task another machine's plan runs there
FROM_PEER = "{run}/{task} from {machine}"


def origin_of(run_id: str, task_id: str, machine: str) -> str:
    return FROM_PEER.format(run=run_id, task=task_id, machine=machine)


def one_task_plan(task: Task, argv: list[str], origin: str) -> str:
    """The plan the peer runs: the task alone, its templates already filled
    in here (`argv`), without `host`, tried once (retries are this plan's)."""
    spec: dict[str, Any] = {
        "id": task.id,
        "kind": task.kind,
        "command": argv,
        "env": task.env,
        "timeout": task.timeout,
        "retries": 0,
        "priority": task.priority,
    }
    if task.cwd is not None:
        spec["cwd"] = task.cwd  # relative: to the peer's home
    if task.gpus is not None:
        spec["gpus"] = list(task.gpus) if isinstance(task.gpus, tuple) else task.gpus
    if task.vram_mib is not None:
        spec["vram_mib"] = task.vram_mib
    return json.dumps({"name": origin, "tasks": [spec]})


class Reply:
    """What `system task` said on stdout so far: the peer's run, then its end."""

    def __init__(self) -> None:
        self.run: str | None = None
        self.end: dict[str, Any] | None = None

    def feed(self, line: str) -> None:
        """One stdout line; anything that is not one of ours is ignored."""
        try:
            data = json.loads(line)
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        if "state" in data:
            self.end = data
        elif isinstance(data.get("run"), str):
            self.run = data["run"]

    def error(self, host: str, said: str = "", rc: int = 0) -> str | None:
        """Why the task failed there (None: it completed). Without an end,
        what the far llama-orch said last on stderr (`said`), or its exit code."""
        if self.end is None:
            last = [ln for ln in said.splitlines() if ln.strip()][-1:]
            why = last[0].removeprefix("error: ") if last else f"exit code {rc}"
        elif self.end.get("state") == "completed":
            return None
        else:
            why = str(self.end.get("error") or self.end.get("state"))
        return f"on {host}: {why}"
