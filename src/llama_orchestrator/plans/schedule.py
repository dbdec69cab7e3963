"""What a plan run does next: pure decisions over the tasks' records, with the
clock passed in (the daemon's runner carries them out and persists them).

    pending --deps completed--> ready --slot free--> running --ok--> completed
                                  ^                     |
                                  +--failed, retries left (backoff)
                                                        +--failed, none left--> failed
    a failed task's dependants: skipped;  cancel: every unfinished task -> cancelled
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from llama_orchestrator.plans import RETRYABLE
from llama_orchestrator.plans.spec import Plan, Task

__all__ = [
    "TaskRecord",
    "PENDING",
    "READY",
    "RUNNING",
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "SKIPPED",
    "TERMINAL",
    "promote",
    "pick",
    "due",
    "start",
    "finish",
    "postpone",
    "overdue",
    "resume",
    "cancel",
    "retry",
    "run_state",
    "next_wakeup",
    "backoff",
]

PENDING, READY, RUNNING = "pending", "ready", "running"
COMPLETED, FAILED, CANCELLED, SKIPPED = "completed", "failed", "cancelled", "skipped"
TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED, SKIPPED})
#: errors keep the end of the cause: that is where the reason usually is
ERROR_CHARS = 200
BACKOFF_MAX = 60.0


@dataclass
class TaskRecord:
    """One task of one run, as persisted."""

    id: str
    state: str = PENDING
    attempts: int = 0
    not_before: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    instance: str | None = None
    error: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    #: a shell task's process (pid, create_time), to kill what a dead daemon left
    pid: int | None = None
    create_time: float | None = None
    #: an llm task: "local" or "external" (an upstream answered), and what it cost
    tier: str | None = None
    cost: float | None = None


Records = Mapping[str, TaskRecord]


def backoff(initial: float, attempt: int) -> float:
    """Seconds before retry number `attempt` (1, 2, ...): initial·2^(attempt-1), capped."""
    return min(BACKOFF_MAX, initial * 2 ** max(0, attempt - 1))


def promote(plan: Plan, records: Records) -> list[str]:
    """pending tasks whose dependencies all completed become ready."""
    moved = []
    for t in plan.tasks:
        r = records[t.id]
        if r.state == PENDING and all(records[d].state == COMPLETED for d in t.depends_on):
            r.state = READY
            moved.append(t.id)
    return moved


def pick(plan: Plan, records: Records, now: float, free: Mapping[str, int]) -> list[str]:
    """Ready tasks to start now: highest priority first, ties in plan order,
    each taking one free slot of its model (or of "shell"). A task whose model
    has no free slot does not hold back a lower-priority one that has."""
    left = {k: n for k, n in free.items() if n > 0}
    chosen: list[str] = []
    if not left:
        return chosen
    for t in due(plan, records, now):
        key = t.slot_key(records[t.id].attempts)
        if left.get(key, 0) > 0:
            left[key] -= 1
            chosen.append(t.id)
            if not any(left.values()):
                break
    return chosen


def due(plan: Plan, records: Records, now: float) -> list[Task]:
    """Ready tasks whose backoff is over: highest priority first, ties in plan order."""
    ready = [
        (-t.priority, i)
        for i, t in enumerate(plan.tasks)
        if records[t.id].state == READY and records[t.id].not_before <= now
    ]
    return [plan.tasks[i] for _, i in sorted(ready)]


def start(records: Records, task_id: str, now: float) -> None:
    r = records[task_id]
    r.state, r.attempts, r.started_at, r.finished_at = RUNNING, r.attempts + 1, now, None
    r.error, r.instance, r.pid, r.create_time = None, None, None, None


def finish(
    plan: Plan,
    records: Records,
    task_id: str,
    now: float,
    error: str | None = None,
    final: bool = False,
) -> list[str]:
    """The end of a running attempt: completed, back to ready after a backoff
    (retries left, unless the error is `final`), or failed with every dependant
    skipped. Returns the tasks whose state changed besides `task_id`."""
    r = records[task_id]
    r.finished_at = now
    if error is None:
        r.state = COMPLETED
        return []
    r.error = error[-ERROR_CHARS:]
    task = plan.task(task_id)
    if r.attempts <= task.retries and not final:
        r.state = READY
        r.not_before = now + backoff(task.backoff, r.attempts)
        return []
    r.state = FAILED
    skipped = []
    for dep_id in plan.dependants(task_id):
        d = records[dep_id]
        if d.state not in TERMINAL and d.state != RUNNING:
            d.state = SKIPPED
            d.error = f"skipped: {task_id} failed"
            skipped.append(dep_id)
    return skipped


def postpone(records: Records, task_id: str, until: float) -> None:
    """A running attempt that never got to an instance (none healthy, no slot
    in time): ready again at `until`, the attempt not counted."""
    r = records[task_id]
    r.state, r.attempts, r.not_before = READY, max(0, r.attempts - 1), until
    r.started_at = None


def overdue(plan: Plan, records: Records, now: float) -> list[str]:
    """Running tasks past their timeout."""
    return [
        t.id
        for t in plan.tasks
        if records[t.id].state == RUNNING and (records[t.id].started_at or now) + t.timeout <= now
    ]


def resume(records: Records) -> list[str]:
    """After a daemon restart: what was running runs again (that attempt counted)."""
    moved = [r.id for r in records.values() if r.state == RUNNING]
    for task_id in moved:
        records[task_id].state = READY
        records[task_id].not_before = 0.0
    return moved


def cancel(records: Records, now: float) -> list[str]:
    """Every unfinished task -> cancelled; returns those that were running."""
    running = []
    for r in records.values():
        if r.state not in TERMINAL:
            if r.state == RUNNING:
                running.append(r.id)
            r.state, r.finished_at = CANCELLED, now
    return running


def retry(records: Records) -> list[str]:
    """failed, skipped and cancelled tasks start over; completed ones keep their results."""
    again = [r.id for r in records.values() if r.state in RETRYABLE]
    for task_id in again:
        r = records[task_id]
        r.state, r.attempts, r.not_before, r.error = PENDING, 0, 0.0, None
        r.started_at = r.finished_at = None
    return again


def run_state(records: Records) -> str:
    states = {r.state for r in records.values()}
    if not states <= TERMINAL:
        return "running"
    if states == {COMPLETED}:
        return "completed"
    if CANCELLED in states:
        return "cancelled"
    return "failed"


def next_wakeup(records: Records, now: float) -> float | None:
    """The soonest end of a backoff still to come, if any."""
    times = [r.not_before for r in records.values() if r.state == READY and r.not_before > now]
    return min(times) if times else None
