"""The control of a home without a daemon: up, down, restart and rm done
here, on SQLite and processes directly (`Control`, which the daemon's client
also is). What it starts runs unsupervised; plans, which only a daemon runs,
are refused, saying why.

Ownership: while a daemon runs, it alone writes the state of the instances
it supervises (`row.supervised`); this control reads those rows and leaves
them alone (`Engine.owns`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NoReturn

from llama_orchestrator.engine.lifecycle import Engine
from llama_orchestrator.engine.process import exit_code, is_alive, stop_tree
from llama_orchestrator.engine.results import Progress, UpResult, running_rm_refused
from llama_orchestrator.engine.status import Activity
from llama_orchestrator.engine.wait import finish_up
from llama_orchestrator.errors import StartFailed, UserError
from llama_orchestrator.states import Desired
from llama_orchestrator.states import InstanceState as S
from llama_orchestrator.store.rows import InstanceRow

if TYPE_CHECKING:
    from llama_orchestrator.engine.status import StatusReply

__all__ = ["Unsupervised"]


class Unsupervised:
    """up/down/restart/rm on one home's engine, with no daemon."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def up(
        self,
        names: list[str],
        *,
        wait: bool = True,
        timeout: float = 300,
        on_progress: Progress | None = None,
        strict: bool = False,
    ) -> list[UpResult]:
        """Start the named instances (validated first, all or nothing) and,
        with `wait`, return once each answers /health with 200.

        Raises StartFailed (exit 1) naming each instance that died or timed
        out, with its exit code and last stderr lines."""
        prepared = self.engine.prepare(names, strict)
        results = [self.engine.spawn(p) for p in prepared]
        for p, r in zip(prepared, results, strict=True):
            r.warnings, r.notes = p.warnings, p.notes
        try:
            return finish_up(self.engine, results, wait, timeout, on_progress)
        except StartFailed:
            self._stopped_if_dead(names)
            raise

    def _stopped_if_dead(self, names: list[str]) -> None:
        """Nothing restarts what `up` started here: one that died starting is
        wanted stopped, or the next daemon would start it again and again."""
        with self.engine.store.transaction():
            for name in names:
                row = self.engine.observe(self.engine.store.get_or_new(name))
                if row.desired == Desired.RUNNING and not is_alive(self.engine.ref(row)):
                    row.desired = Desired.STOPPED
                    self.engine.store.save(row)

    # --- down / restart / rm ----------------------------------------------------

    def down(self, names: list[str], timeout: float | None = None) -> list[str]:
        """Stop the named instances; return only when no process of theirs lives."""
        from llama_orchestrator.config.validate import load_all

        to_stop: list[tuple[InstanceRow, float]] = []
        loaded = {x.name: x.config for x in load_all(self.engine.home)}
        with self.engine.store.transaction():
            for name in names:
                row = self.engine.observe(self.engine.store.get_or_new(name))
                row.desired = Desired.STOPPED
                if is_alive(self.engine.ref(row)):
                    cfg = loaded.get(name)
                    grace = timeout if timeout is not None else (cfg.stop_timeout if cfg else 10.0)
                    self.engine.store.set_state(row, S.STOPPING, f"stopping process {row.pid}")
                    to_stop.append((row, grace))
                else:
                    new = S.STOPPED if row.state != S.CREATED else S.CREATED
                    self.engine.store.set_state(row, new, "stopped")
        from concurrent.futures import ThreadPoolExecutor  # ~17 ms: only when stopping

        with ThreadPoolExecutor(max_workers=max(1, len(to_stop))) as pool:
            graceful = list(pool.map(lambda rg: self._stop_one(*rg), to_stop))
        for (row, grace), ok in zip(to_stop, graceful, strict=True):
            code = exit_code(row.pid) if row.pid else None
            how = "stopped" if ok else f"killed after {grace:g}s without exiting"
            self.engine.store.set_state(
                row,
                S.STOPPED,
                f"process {row.pid} {how}",
                {"graceful": ok},
                exited_at=self.engine.clock(),
                exit_code=code,
            )
        return [row.name for row, _ in to_stop]

    def _stop_one(self, row: InstanceRow, grace: float) -> bool:
        ref = self.engine.ref(row)
        return stop_tree(ref, grace) if ref else True

    def restart(
        self,
        names: list[str],
        *,
        timeout: float = 300,
        on_progress: Progress | None = None,
        rolling: bool = False,
    ) -> list[UpResult]:
        if rolling:
            raise UserError(
                "A rolling restart needs the daemon (its router drains each replica).",
                hint="Start it with `llama-orch daemon start`, or restart without --rolling.",
            )
        self.engine.prepare(names)  # refuse a broken config before stopping a working server
        self.down(names)
        return self.up(names, timeout=timeout, on_progress=on_progress)

    def rm(self, name: str, force: bool = False) -> None:
        """Remove an instance: its config folder, logs and state."""
        row = self.engine.observe(self.engine.store.get_or_new(name))
        if is_alive(self.engine.ref(row)):
            if not force:
                raise running_rm_refused(name)
            self.down([name])
        self.engine.forget(name)

    def status(self) -> StatusReply:
        """What `ps` shows: every instance's status view, and card warnings."""
        from llama_orchestrator.engine.views import status_reply

        return status_reply(self.engine)

    def activity(self) -> Activity:
        return Activity()  # only a daemon queues loads and routes requests

    # --- plans: the daemon's (Control's plan verbs) ------------------------------------

    def _plans_need_the_daemon(self) -> UserError:
        return UserError(
            "Plans run in the llama-orch daemon, and none runs for this home.",
            hint="Start it with `llama-orch daemon start` (`plan run` starts it too).",
        )

    def submit_plan(self, path: Any, text: str, given_vars: dict[str, str]) -> NoReturn:
        raise self._plans_need_the_daemon()

    def cancel_plan(self, run_id: str) -> NoReturn:
        raise self._plans_need_the_daemon()

    def retry_plan(self, run_id: str) -> NoReturn:
        raise self._plans_need_the_daemon()
