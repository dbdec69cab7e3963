"""The daemon's plan runner: carries out `plans.schedule`'s decisions.

One asyncio task per active run. Each turn: collect finished attempts, cancel
overdue ones, promote, pick by priority within the free slots (llm tasks: the
router's own slot counts, so plan tasks and client requests share instances
fairly; shell tasks: one per core), persist every change in one transaction,
then start the picked attempts. llm attempts go through `Router.complete`
(balancing, queueing); shell attempts are argv lists in their own process
group, killed with their tree on timeout or cancel. A run whose daemon died is
resumed at start: a shell task whose process ended meanwhile is recorded as
it ended (plans.exitfile), never run twice; what still runs is killed and
runs again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llama_orchestrator import platform
from llama_orchestrator.daemon.hosttasks import SLOTS as HOST_SLOTS
from llama_orchestrator.daemon.hosttasks import HostTasks
from llama_orchestrator.daemon.leases import Leases
from llama_orchestrator.engine.process import ProcRef, create_time_of, stop_tree
from llama_orchestrator.errors import UserError
from llama_orchestrator.home import Home
from llama_orchestrator.plans import WAITING, exitfile
from llama_orchestrator.plans import schedule as S
from llama_orchestrator.plans.check import check_output
from llama_orchestrator.plans.records import (
    RunFiles,
    create_run,
    load_run,
    open_runs,
    require_run,
    save,
)
from llama_orchestrator.plans.spec import HOST_PREFIX, Plan, Task, parse_plan
from llama_orchestrator.plans.template import Attempt, prompt_messages, render
from llama_orchestrator.router.balance import candidates, free_slots
from llama_orchestrator.router.proxy import Completion, Router, RouterError
from llama_orchestrator.store.database import Store
from llama_orchestrator.store.rows import Lease
from llama_orchestrator.upstreams import redact

if TYPE_CHECKING:
    from llama_orchestrator.daemon.cluster import ClusterScripts

__all__ = ["PlanRunner"]

log = logging.getLogger("llama_orchestrator.daemon")
#: how often a run looks for slots freed by other traffic when nothing wakes it
POLL_S = 0.5
#: a task that found no healthy instance or no slot in time tries again this much later
POSTPONE_S = 1.0
#: a shell task being stopped gets this long to exit before its tree is killed
KILL_GRACE_S = 0.5


@dataclass
class _Active:
    plan: Plan
    records: dict[str, S.TaskRecord]
    files: RunFiles
    attempts: dict[str, asyncio.Task[dict[str, Any]]] = field(default_factory=dict)
    timed_out: set[str] = field(default_factory=set)
    #: the GPU leases of script tasks picked this turn, handed to their attempts
    leases: dict[str, list[Lease]] = field(default_factory=dict)
    #: in a cluster home: the node and cards of the script tasks picked this turn
    placed: dict[str, Any] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    driver: asyncio.Task[None] | None = None


class PlanRunner:
    def __init__(
        self,
        home: Home,
        store: Store,
        router: Router,
        known_models: Callable[[], set[str] | None],
        clock: Callable[[], float] = time.time,
        leases: Leases | None = None,
        hosts: HostTasks | None = None,
        cluster: ClusterScripts | None = None,
    ) -> None:
        self.home = home
        self.store = store
        self.router = router
        self.known_models = known_models
        self.clock = clock
        self.leases = leases
        #: a cluster home's script tasks run on its nodes, not under this machine's leases
        self.cluster = cluster
        self.hosts = hosts or HostTasks([])
        self.shell_slots = os.cpu_count() or 2
        self.active: dict[str, _Active] = {}

    # --- the API's verbs --------------------------------------------------------

    async def start(self) -> None:
        """Resume every run a previous daemon left unfinished."""
        for run_id in open_runs(self.store):
            view = load_run(self.store, run_id)
            if view is None:
                continue
            active = _Active(view.plan, view.records, RunFiles(self.run_dir(run_id)))
            ended = self._ended_meanwhile(view.plan, view.records, active.files)
            moved = S.resume(view.records)
            save(self.store, run_id, view.plan, view.records, moved + ended)
            for task_id in ended:
                active.files.event(**self._event(active, task_id))
            for task_id in moved:
                active.files.event(
                    task=task_id, state=S.READY, note="requeued after a daemon restart"
                )
            self._launch(run_id, active)
            log.info(f"plan run {run_id} resumed ({len(moved)} task(s) requeued)")

    def _ended_meanwhile(
        self, plan: Plan, records: dict[str, S.TaskRecord], files: RunFiles
    ) -> list[str]:
        """The shell tasks a dead daemon left running: those whose process ended
        while no daemon ran are recorded as ended (their exit file says how),
        never run again; what still runs is killed, to run again. The tasks
        whose state changed."""
        changed: list[str] = []
        now = self.clock()
        for r in list(records.values()):
            if r.state != S.RUNNING or not (r.pid and r.create_time):
                continue
            done = exitfile.read(files.exit_path(r.id, r.attempts))
            stop_tree(ProcRef(r.pid, r.create_time), KILL_GRACE_S)  # a leftover, if any
            if done is None or plan.task(r.id).host is not None:
                continue  # unfinished: it runs again (a peer's: followed there)
            result = _shell_result(done, files.output_path(r.id, "err"))
            r.pid = r.create_time = None
            changed += [r.id, *S.finish(plan, records, r.id, now, result.get("error"))]
        return changed

    def submit(
        self, text: str, source: str, base_dir: str, given_vars: dict[str, str]
    ) -> tuple[str, list[str]]:
        """The new run's id, and the models its tasks name that no healthy
        instance serves now (those tasks wait until one does)."""
        plan = parse_plan(
            text,
            source,
            known_models=self.known_models(),
            given_vars=given_vars,
            base_dir=Path(base_dir),
            hosts=self.hosts.names(),
        )
        self._refuse_unplaceable(plan)
        run_id = secrets.token_hex(4)
        files = RunFiles(self.run_dir(run_id))
        files.create(plan, text)
        now = self.clock()
        create_run(self.store, run_id, plan, source, now)
        view = load_run(self.store, run_id)
        assert view is not None
        self.store.add_event(None, "plan_started", f"plan run {run_id} ({plan.name}) started")
        self._launch(run_id, _Active(plan, view.records, files))
        replicas = self.router.replicas()
        wanted = sorted({m for t in plan.tasks if (m := t.model_for(1))})  # first attempts
        return run_id, [m for m in wanted if free_slots(m, replicas, {}) == 0]

    def _refuse_unplaceable(self, plan: Plan) -> None:
        """Script tasks that ask for cards this machine does not have would wait
        forever (their own timeout counts only once they run): refused, as an
        instance pinned to an absent card is."""
        placer = self.cluster or self.leases
        if placer is None:
            return
        problems = [
            f"task '{t.id}': {why}"
            for t in plan.tasks
            if t.kind == "script" and t.host is None and (why := placer.never(t))
        ]
        if problems:
            where = "this cluster" if self.cluster else "this machine"
            raise UserError(
                f"The plan asks for GPUs {where} does not have: {'; '.join(problems)}.",
                hint='Ask for cards it has (`llama-orch gpus` lists them), or "host" a machine '
                "that has them.",
            )

    async def cancel(self, run_id: str) -> list[str]:
        active = self.active.get(run_id)
        if active is None:
            require_run(self.store, run_id)
            raise UserError(f"Plan run {run_id} has already finished; nothing to cancel.")
        running = S.cancel(active.records, self.clock())
        for task_id in running:
            active.attempts[task_id].cancel()
        if running:
            await asyncio.wait([active.attempts[t] for t in running])
        save(self.store, run_id, active.plan, active.records, active.records, self.clock())
        for task_id in running:
            active.files.event(task=task_id, state=S.CANCELLED)
        active.wake.set()
        return running

    def retry(self, run_id: str) -> list[str]:
        if run_id in self.active:
            raise UserError(
                f"Plan run {run_id} is still running.",
                hint=f"Wait for it, or `llama-orch plan cancel {run_id}` first.",
            )
        view = require_run(self.store, run_id)
        again = S.retry(view.records)
        if not again:
            raise UserError(f"Plan run {run_id} has no failed, skipped or cancelled task.")
        save(self.store, run_id, view.plan, view.records, again)
        files = RunFiles(self.run_dir(run_id))
        for task_id in again:
            files.event(task=task_id, state=S.PENDING, note="retry")
        self._launch(run_id, _Active(view.plan, view.records, files))
        return again

    async def shutdown(self) -> None:
        """Daemon stop: runs stay `running` in the database (the next daemon
        resumes them); their shell processes are killed, nothing leaks. Tasks
        on peers go on there, and the next daemon follows them again."""
        self.hosts.closing = True
        for active in self.active.values():
            if active.driver is not None:
                active.driver.cancel()
            for attempt in active.attempts.values():
                attempt.cancel()
        pending = [a for x in self.active.values() for a in (*x.attempts.values(), x.driver) if a]
        if pending:
            await asyncio.wait(pending, timeout=10)

    def run_dir(self, run_id: str) -> Path:
        return self.home.plan_run_dir(run_id)

    # --- one run ------------------------------------------------------------------

    def _launch(self, run_id: str, active: _Active) -> None:
        self.active[run_id] = active
        active.driver = asyncio.create_task(self._drive(run_id, active))

    async def _drive(self, run_id: str, active: _Active) -> None:
        plan, records = active.plan, active.records
        try:
            while True:
                now = self.clock()
                changed = self._collect(active, now)
                for task_id in S.overdue(plan, records, now):
                    if task_id not in active.timed_out:
                        active.timed_out.add(task_id)
                        active.attempts[task_id].cancel()
                changed += S.promote(plan, records)
                scripts, waiting = self._lease_scripts(run_id, active, now)
                changed += waiting
                picked = S.pick(plan, records, now, self._free(plan, records)) + scripts
                for task_id in picked:
                    S.start(records, task_id, now)
                if changed or picked:
                    touched = {*changed, *picked}
                    save(self.store, run_id, plan, records, touched, now)
                    active.files.events(
                        [self._event(active, t) for t in sorted(touched, key=plan.index)]
                    )
                state = S.run_state(records)
                for task_id in picked:
                    active.attempts[task_id] = asyncio.create_task(
                        self._attempt(run_id, active, plan.task(task_id))
                    )
                if state != "running" and not active.attempts:
                    self.store.add_event(
                        None, "plan_finished", f"plan run {run_id} finished: {state}"
                    )
                    return
                await self._sleep(active, now)
        except Exception as exc:  # a bug or a broken database: say so, the run stays open
            log.exception(f"plan run {run_id} stopped")
            with contextlib.suppress(Exception):
                self.store.add_event(
                    None,
                    "plan_error",
                    f"plan run {run_id} stopped: {type(exc).__name__}: {exc}; "
                    "`llama-orch daemon stop` and `daemon start` resume it",
                )
        finally:
            self.active.pop(run_id, None)

    def _collect(self, active: _Active, now: float) -> list[str]:
        """Finished attempts -> records (unless cancelled meanwhile)."""
        changed = []
        for task_id, attempt in list(active.attempts.items()):
            if not attempt.done():
                continue
            del active.attempts[task_id]
            record = active.records[task_id]
            if record.state != S.RUNNING:  # cancelled: already recorded
                continue
            error: str | None
            final = False
            if attempt.cancelled():
                error = f"timed out after {active.plan.task(task_id).timeout:g}s"
                active.timed_out.discard(task_id)
            elif attempt.exception() is not None:
                exc = attempt.exception()
                error = str(exc) or type(exc).__name__
            else:
                result = attempt.result()
                if result.pop("busy", False):  # never reached an instance
                    S.postpone(active.records, task_id, now + POSTPONE_S)
                    changed.append(task_id)
                    continue
                error = result.pop("error", None)
                final = result.pop("final", False)
                for key, value in result.items():
                    setattr(record, key, value)
            skipped = S.finish(active.plan, active.records, task_id, now, error, final)
            changed += [task_id, *skipped]
        return changed

    def _lease_scripts(
        self, run_id: str, active: _Active, now: float
    ) -> tuple[list[str], list[str]]:
        """Ready script tasks that get their GPUs now (highest priority first),
        and those whose reason to wait changed (kept in their `error`, which
        `plan status` shows)."""
        records = active.records
        picked, changed = [], []
        for task in S.due(active.plan, records, now):
            if task.kind != "script" or task.host is not None:  # a peer leases its own
                continue
            placer = self.cluster or self.leases
            if placer is not None and (why := placer.never(task)):
                # the machine changed since `plan run` checked (a card gone)
                error = f"no GPU here can run it: {why}"
                changed += [task.id, *S.finish(active.plan, records, task.id, now, error, True)]
                continue
            got: Any = (
                placer.reserve(run_id, task) if placer is not None else "this daemon leases no GPUs"
            )
            if isinstance(got, str):
                why = f"{WAITING}a GPU: {got}"
                if records[task.id].error != why:
                    records[task.id].error = why
                    changed.append(task.id)
                continue
            if self.cluster is not None:
                active.placed[task.id] = got
            else:
                active.leases[task.id] = got
            picked.append(task.id)
        return picked, changed

    def _free(self, plan: Plan, records: dict[str, S.TaskRecord]) -> dict[str, int]:
        router = self.router
        replicas = router.replicas()
        keys = {
            plan.task(r.id).slot_key(r.attempts) for r in records.values() if r.state == S.READY
        }
        free = {
            k: free_slots(k, replicas, router.in_flight)
            for k in keys
            if k != "shell" and not k.startswith(HOST_PREFIX)
        }
        for k, n in free.items():
            # all busy (with interactive requests): one task waits in the router's
            # queue as batch work, so it gets its share of the freed slots
            if n == 0 and candidates(k, replicas) and not router.waiting(k, "batch"):
                free[k] = 1
        # what every run has running, by slot key: shell slots are the machine's
        # cores, a peer's are HOST_SLOTS, both shared by every run
        busy = Counter(o.plan.task(t).slot_key() for o in self.active.values() for t in o.attempts)
        free["shell"] = max(0, self.shell_slots - busy["shell"])
        for k in keys:
            if k.startswith(HOST_PREFIX):
                free[k] = max(0, HOST_SLOTS - busy[k])
        return free

    async def _sleep(self, active: _Active, now: float) -> None:
        deadlines = [
            (active.records[t].started_at or now) + active.plan.task(t).timeout
            for t in active.attempts
        ]
        wakeup = S.next_wakeup(active.records, now)
        until = min([now + POLL_S, *deadlines, *([wakeup] if wakeup else [])])
        active.wake.clear()
        waiter = asyncio.ensure_future(active.wake.wait())
        try:
            await asyncio.wait(
                [waiter, *active.attempts.values()],
                timeout=max(0.0, until - self.clock()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            waiter.cancel()

    def _event(self, active: _Active, task_id: str) -> dict[str, Any]:
        r = active.records[task_id]
        data: dict[str, Any] = {"task": task_id, "state": r.state, "attempt": r.attempts}
        if r.instance:
            data["instance"] = r.instance
        if r.state in S.TERMINAL and r.started_at and r.finished_at:
            data["duration_ms"] = round((r.finished_at - r.started_at) * 1000, 1)
        if r.completion_tokens is not None and r.state == S.COMPLETED:
            data["tokens"] = {"prompt": r.prompt_tokens, "completion": r.completion_tokens}
        if r.error and r.state != S.COMPLETED:
            data["error"] = r.error
        return data

    # --- attempts -----------------------------------------------------------------

    async def _attempt(self, run_id: str, active: _Active, task: Task) -> dict[str, Any]:
        """One try: a dict of record fields (with "error" when it failed)."""
        outputs = {d: active.files.read_output(d) for d in task.depends_on}
        base = Path(active.plan.base_dir)

        def read_file(rel: str) -> str:
            return (base / rel).read_text(encoding="utf-8", errors="replace")

        if task.kind == "llm":
            return await self._llm(run_id, active, task, outputs, read_file)
        if task.host is not None:
            return await self.hosts.run(
                run_id,
                task,
                self._argv(active, task, outputs, read_file),
                active.files.output_path(task.id),
                active.files.output_path(task.id, "err"),
                lambda pid: self._hold(run_id, active, task.id, pid),
            )
        if task.kind != "script":
            return await self._shell(run_id, active, task, outputs, read_file)
        if self.cluster is not None:
            return await self._on_node(run_id, active, task, outputs, read_file)
        leases = active.leases.pop(task.id)  # reserved when it was picked
        assert self.leases is not None  # no leases, no script task is picked
        why = "the task was cancelled or timed out"
        try:
            env = await self.leases.begin(leases)
            result = await self._shell(run_id, active, task, outputs, read_file, env)
            why = "the task failed" if result.get("error") else "the task is done"
            return result
        finally:  # whatever happened to the task, the cards go back
            await asyncio.shield(self.leases.end(leases, why))

    async def _llm(
        self,
        run_id: str,
        active: _Active,
        task: Task,
        outputs: dict[str, str],
        read_file: Callable[[str], str],
    ) -> dict[str, Any]:
        """One attempt: to the task's model, or (escalated) to its upstream
        with the failed attempts handed over. It fails when the request does
        or its output fails the task's `check`."""
        record = active.records[task.id]
        number = record.attempts
        model = task.model_for(number)
        assert model is not None
        external = [d for d in task.depends_on if active.records[d].tier == "external"]
        failed = active.files.failed_attempts(task.id, number) if task.escalated(number) else []
        messages = prompt_messages(task, outputs, active.plan.vars, read_file, external, failed)
        body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": task.max_tokens}
        if task.temperature is not None:
            body["temperature"] = task.temperature
        began = self.clock()
        try:
            done = await self.router.complete(
                model, body, priority=task.priority, origin=(run_id, task.id)
            )
        except RouterError as exc:
            if not exc.busy:  # it reached a model: an attempt that failed
                active.files.failed_attempt(task.id, Attempt(number, None, str(exc)))
                self._sample(active, task, number, model, messages, None, None, began, str(exc))
            return {"error": str(exc), "final": exc.final, "busy": exc.busy}
        data = done.data
        usage = data.get("usage") or {}
        result: dict[str, Any] = {
            "instance": done.instance,
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "tier": done.tier,
            "cost": None if done.cost is None else (record.cost or 0.0) + done.cost,
        }
        text: str | None
        why: str | None
        try:
            text = str(data["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError):
            text, why = None, f"{done.instance} answered without a message: {str(data)[-200:]}"
        else:
            why = check_output(task.check, text)
        self._sample(active, task, number, model, messages, done, text, began, why)
        if why is not None:
            active.files.failed_attempt(task.id, Attempt(number, text, why))
            return {**result, "error": why}
        assert text is not None
        active.files.write_output(task.id, text)
        return result

    def _sample(
        self,
        active: _Active,
        task: Task,
        number: int,
        model: str,
        messages: list[dict[str, str]],
        done: Completion | None,
        text: str | None,
        began: float,
        error: str | None,
    ) -> None:
        """One line of the plan's training log, when it keeps one: a sensitive
        task's prompt and answer are left out, and keys are redacted."""
        if not active.plan.log_samples:
            return
        usage = (done.data.get("usage") if done else None) or {}
        line: dict[str, Any] = {
            "task": task.id,
            "attempt": number,
            "model": model,
            "instance": done.instance if done else None,
            "tier": done.tier if done else ("external" if task.escalated(number) else "local"),
            "tokens": {
                "prompt": usage.get("prompt_tokens"),
                "completion": usage.get("completion_tokens"),
            },
            "cost": done.cost if done else None,
            "elapsed_s": round(self.clock() - began, 3),
            "success": error is None,
        }
        if error is not None:
            line["error"] = error
        if not task.sensitive:
            keys = self.router.externals.keys()
            line["prompt"] = [{**m, "content": redact(m["content"], keys)} for m in messages]
            line["answer"] = None if text is None else redact(text, keys)
        active.files.sample(line)

    async def _shell(
        self,
        run_id: str,
        active: _Active,
        task: Task,
        outputs: dict[str, str],
        read_file: Callable[[str], str],
        gpu_env: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """`gpu_env`: a script task's leased cards (see daemon.leases)."""
        argv = self._argv(active, task, outputs, read_file)
        cwd = Path(active.plan.base_dir) / (task.cwd or ".")
        out_path, err_path = (
            active.files.output_path(task.id),
            active.files.output_path(task.id, "err"),
        )
        # its end is written where a daemon started after a crash finds it
        exit_file = active.files.exit_path(task.id, active.records[task.id].attempts)
        try:
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                env = {**os.environ, **task.env, **(gpu_env or {})}
                proc = platform.spawn(exitfile.wrap(argv, exit_file), env, cwd, out, err)
        except OSError as exc:
            return {"error": f"cannot run {argv[0]!r}: {exc.strerror or exc}"}
        ref = self._hold(run_id, active, task.id, proc.pid)
        try:
            code = await asyncio.to_thread(proc.wait)
        except asyncio.CancelledError:  # timed out or cancelled: the whole tree goes
            with contextlib.suppress(Exception):
                await asyncio.shield(asyncio.to_thread(stop_tree, ref, KILL_GRACE_S))
            raise
        return _shell_result(exitfile.read(exit_file) or exitfile.Ended(code), err_path)

    async def _on_node(
        self,
        run_id: str,
        active: _Active,
        task: Task,
        outputs: dict[str, str],
        read_file: Callable[[str], str],
    ) -> dict[str, Any]:
        """A cluster home's script task: run on the node and cards it was
        given (`ClusterScripts`), its output written here."""
        assert self.cluster is not None
        where = active.placed.pop(task.id)
        argv = self._argv(active, task, outputs, read_file)
        cwd = str(Path(active.plan.base_dir) / (task.cwd or "."))
        got = await self.cluster.run(f"{run_id}/{task.id}", where, argv, dict(task.env), cwd)
        out_path = active.files.output_path(task.id)
        err_path = active.files.output_path(task.id, "err")
        out_path.write_bytes(got.get("out", b""))
        err_path.write_bytes(got.get("err", b""))
        result: dict[str, Any] = {
            "instance": f"{where.node.name}:gpu{','.join(map(str, where.devices))}"
        }
        if got.get("error"):
            return {**result, "error": got["error"]}
        ended = exitfile.Ended(got["code"] if got["code"] is not None else -got["signal"])
        return {**result, **_shell_result(ended, err_path)}

    def _argv(
        self,
        active: _Active,
        task: Task,
        outputs: dict[str, str],
        read_file: Callable[[str], str],
    ) -> list[str]:
        """A shell or script task's command, its templates filled in."""
        return [
            render(a, task, outputs, active.plan.vars, read_file, wrap=False)[0]
            for a in task.command
        ]

    def _hold(self, run_id: str, active: _Active, task_id: str, pid: int) -> ProcRef:
        """The attempt's process, recorded: a dead daemon's successor kills it."""
        ref = ProcRef(pid, create_time_of(pid))
        record = active.records[task_id]
        record.pid, record.create_time = ref.pid, ref.create_time
        save(self.store, run_id, active.plan, active.records, [task_id])
        return ref


def _shell_result(ended: exitfile.Ended, err_path: Path) -> dict[str, Any]:
    """The record fields of a shell attempt that ended so (an "error" unless 0)."""
    result: dict[str, Any] = {"pid": None, "create_time": None}
    if ended.error:
        result["error"] = ended.error
    elif ended.code != 0:
        try:
            tail = err_path.read_text(encoding="utf-8", errors="replace").strip()[-200:]
        except OSError:
            tail = ""
        result["error"] = f"exit code {ended.code}" + (f": {tail}" if tail else "")
    return result
