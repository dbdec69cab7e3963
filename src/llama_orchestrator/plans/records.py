"""Plan runs in the state database and in `<home>/plans/<run-id>/`: the plan
as submitted (plan.json), one file per task output (<task>.out, shell stderr
in <task>.err) and run.jsonl, one JSON event per transition."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from llama_orchestrator.engine.status import iso
from llama_orchestrator.errors import UnknownRun, UserError
from llama_orchestrator.files import private_dir
from llama_orchestrator.names import TAG_PREFIX, tag_set
from llama_orchestrator.plans.schedule import TaskRecord, run_state
from llama_orchestrator.plans.spec import Plan
from llama_orchestrator.plans.template import Attempt
from llama_orchestrator.store.database import Store

__all__ = [
    "RunView",
    "RunFiles",
    "create_run",
    "save",
    "load_run",
    "require_run",
    "require_task",
    "list_runs",
    "open_runs",
    "named_run",
]

_COLUMNS = [f.name for f in fields(TaskRecord) if f.name != "id"]


@dataclass
class RunView:
    id: str
    name: str
    state: str
    created_at: float
    finished_at: float | None
    source: str
    plan: Plan
    records: dict[str, TaskRecord]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records.values():
            out[r.state] = out.get(r.state, 0) + 1
        return out

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        now = now or time.time()
        tasks = []
        for t in self.plan.tasks:
            r = self.records[t.id]
            end = r.finished_at if r.finished_at is not None else now
            tasks.append(
                {
                    "id": t.id,
                    "kind": t.kind,
                    # what it asked the router for: an alias, or the tags an instance must carry
                    "model": t.model if t.model and not t.model.startswith(TAG_PREFIX) else None,
                    "tags": sorted(tag_set(t.model))
                    if t.model and t.model.startswith(TAG_PREFIX)
                    else None,
                    "state": r.state,
                    "attempts": r.attempts,
                    "instance": r.instance,
                    "elapsed_s": round(end - r.started_at, 2) if r.started_at else None,
                    "error": r.error,
                    "prompt_tokens": r.prompt_tokens,
                    "completion_tokens": r.completion_tokens,
                    "tier": r.tier,
                    "cost": None if r.cost is None else round(r.cost, 6),
                }
            )
        counts = self.counts()
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "created_at": iso(self.created_at),
            "finished_at": iso(self.finished_at),
            "elapsed_s": round((self.finished_at or now) - self.created_at, 3),
            "source": self.source,
            "tasks_total": len(tasks),
            "tasks_done": counts.get("completed", 0),
            "counts": counts,
            "tasks": tasks,
        }


def create_run(store: Store, run_id: str, plan: Plan, source: str, now: float) -> None:
    with store.transaction():
        store.execute(
            "INSERT INTO plan_runs (id, name, state, created_at, source, plan) "
            "VALUES (?, ?, 'running', ?, ?, ?)",
            (run_id, plan.name, now, source, json.dumps(plan.to_json())),
        )
        records = {t.id: TaskRecord(t.id) for t in plan.tasks}
        save(store, run_id, plan, records, records)


def save(
    store: Store,
    run_id: str,
    plan: Plan,
    records: Mapping[str, TaskRecord],
    changed: Iterable[str],
    now: float | None = None,
) -> str:
    """Write the changed records and the run's state (one transaction); returns it."""
    state = run_state(records)
    with store.transaction():
        for task_id in changed:
            r = records[task_id]
            values = [getattr(r, c) for c in _COLUMNS]
            store.execute(
                f"INSERT INTO plan_tasks (run_id, task_id, idx, {', '.join(_COLUMNS)}) "
                f"VALUES (?, ?, ?, {', '.join('?' for _ in _COLUMNS)}) "
                "ON CONFLICT (run_id, task_id) DO UPDATE SET "
                + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS),
                (run_id, r.id, plan.index(r.id), *values),
            )
        finished = (now or time.time()) if state != "running" else None
        store.execute(
            "UPDATE plan_runs SET state = ?, finished_at = ? WHERE id = ?",
            (state, finished, run_id),
        )
    return state


def _record(row: Any) -> TaskRecord:
    return TaskRecord(row["task_id"], **{c: row[c] for c in _COLUMNS})


def load_run(store: Store, run_id: str) -> RunView | None:
    run = store.execute("SELECT * FROM plan_runs WHERE id = ?", (run_id,)).fetchone()
    if run is None:
        return None
    rows = store.execute(
        "SELECT * FROM plan_tasks WHERE run_id = ? ORDER BY idx", (run_id,)
    ).fetchall()
    return RunView(
        run["id"],
        run["name"],
        run["state"],
        run["created_at"],
        run["finished_at"],
        run["source"],
        Plan.from_json(json.loads(run["plan"])),
        {row["task_id"]: _record(row) for row in rows},
    )


def require_run(store: Store, run_id: str) -> RunView:
    found = load_run(store, run_id)
    if found is None:
        raise UnknownRun(run_id)
    return found


def require_task(view: RunView, task_id: str) -> dict[str, Any]:
    """The task's entry in view.to_json(), or a UserError naming the tasks there are."""
    for task in view.to_json()["tasks"]:
        if task["id"] == task_id:
            return dict(task)
    raise UserError(
        f"Plan run {view.id} has no task '{task_id}'.",
        hint=f"Its tasks: {', '.join(t.id for t in view.plan.tasks)}.",
    )


def list_runs(store: Store, limit: int = 50) -> list[RunView]:
    ids = store.execute(
        "SELECT id FROM plan_runs ORDER BY created_at DESC LIMIT ?", (limit,)
    ).fetchall()
    return [v for v in (load_run(store, row["id"]) for row in ids) if v is not None]


def named_run(store: Store, name: str, states: tuple[str, ...]) -> str | None:
    """The newest run called `name` that is in one of `states`, if any."""
    row = store.execute(
        f"SELECT id FROM plan_runs WHERE name = ? AND state IN ({', '.join('?' for _ in states)}) "
        "ORDER BY created_at DESC LIMIT 1",
        (name, *states),
    ).fetchone()
    return str(row["id"]) if row else None


def open_runs(store: Store) -> list[str]:
    rows = store.execute(
        "SELECT id FROM plan_runs WHERE state = 'running' ORDER BY created_at"
    ).fetchall()
    return [row["id"] for row in rows]


class RunFiles:
    """The run's folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def create(self, plan: Plan, submitted: str) -> None:
        private_dir(self.folder.parent)  # plans/: every run's prompts and outputs
        self.folder.mkdir(exist_ok=True)
        self._write("plan.json", submitted)
        self._write("plan.resolved.json", json.dumps(plan.to_json(), indent=2))

    def _write(self, name: str, text: str) -> None:
        tmp = self.folder / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.folder / name)

    def output_path(self, task_id: str, suffix: str = "out") -> Path:
        return self.folder / f"{task_id}.{suffix}"

    def exit_path(self, task_id: str, attempt: int) -> Path:
        """Where a shell attempt's end is written (plans.exitfile)."""
        return self.folder / f"{task_id}.{attempt}.exit"

    def write_output(self, task_id: str, text: str) -> None:
        # no temp file: a torn output belongs to an attempt still recorded as
        # running, which runs again after a crash and rewrites it
        self.output_path(task_id).write_text(text, encoding="utf-8")

    def read_output(self, task_id: str, suffix: str = "out") -> str:
        return self.output_path(task_id, suffix).read_text(encoding="utf-8", errors="replace")

    def task_output(self, task_id: str) -> tuple[str | None, str | None]:
        """A task's output and (a shell task's) stderr; None where there is none yet."""

        def read(suffix: str) -> str | None:
            try:
                return self.read_output(task_id, suffix)
            except FileNotFoundError:
                return None

        return read("out"), read("err")

    def failed_attempt(self, task_id: str, attempt: Attempt) -> None:
        """Keep a failed llm attempt (what it answered, why it failed): an
        escalated attempt hands them over."""
        line = {"number": attempt.number, "output": attempt.output, "error": attempt.error}
        with open(self.output_path(task_id, "attempts.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    def failed_attempts(self, task_id: str, before: int) -> list[Attempt]:
        """The failed attempts numbered below `before`, the latest of each number
        (a `plan retry` numbers them from 1 again)."""
        try:
            text = self.read_output(task_id, "attempts.jsonl")
        except FileNotFoundError:
            return []
        found: dict[int, Attempt] = {}
        for line in text.splitlines():
            try:
                d = json.loads(line)
                found[int(d["number"])] = Attempt(
                    int(d["number"]), d.get("output"), str(d["error"])
                )
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line of a killed daemon
        return [found[n] for n in sorted(found) if n < before]

    def sample(self, data: dict[str, Any]) -> None:
        """One line of the training log (`log_samples`)."""
        with open(self.folder / "samples.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"ts": round(time.time(), 3), **data}) + "\n")

    def event(self, **data: Any) -> None:
        self.events([data])

    def events(self, batch: list[dict[str, Any]]) -> None:
        ts = round(time.time(), 3)
        lines = "".join(json.dumps({"ts": ts, **data}) + "\n" for data in batch)
        with open(self.folder / "run.jsonl", "a", encoding="utf-8") as f:
            f.write(lines)
