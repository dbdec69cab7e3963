"""The lifecycle engine: up, down, restart, rm and observing instances.

This is the one implementation the CLI, the demo, the TUI and the daemon call.
It works on SQLite + processes directly. Decisions live in pure modules
(command, health.classify, policy, states); this module wires them to I/O.

Ownership: while a daemon runs, it alone writes the state of the instances it
supervises (`row.supervised`); other engines (`supervisor=False`) read those
rows and leave them alone. Without a daemon, whoever looks records what it sees.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import psutil

from llama_orchestrator import platform
from llama_orchestrator.engine import health, logs
from llama_orchestrator.engine.process import (
    ProcRef,
    activity,
    create_time_of,
    exit_code,
    find,
    is_alive,
    stop_tree,
    track_child,
)
from llama_orchestrator.engine.step import Watch, step
from llama_orchestrator.errors import PortConflict, StartFailed, UnknownInstance, UserError
from llama_orchestrator.files import disk_full, is_disk_full, private_dir
from llama_orchestrator.home import Home, check_name, daemon_lock_held
from llama_orchestrator.states import RUNNING_STATES, Desired
from llama_orchestrator.states import InstanceState as S
from llama_orchestrator.store import InstanceRow, Store, Unsaved

if TYPE_CHECKING:
    # Imported where used: a command talking to the daemon (`up`, `down`)
    # never reads a config, and pydantic's import alone is ~60 ms of every run.
    from llama_orchestrator.config import InstanceConfig, Settings, UpstreamConfig
    from llama_orchestrator.config.prepare import Prepared
    from llama_orchestrator.engine.status import Activity, StatusReply
    from llama_orchestrator.gpu import Discovery

__all__ = [
    "Engine",
    "UpResult",
    "Progress",
    "EXIT_TAIL_LINES",
    "exit_text",
    "ended",
    "running_rm_refused",
]

EXIT_TAIL_LINES = 20
POLL_INTERVAL = 0.05  # seconds between health probes while waiting for `up`
STATE_POLL_INTERVAL = 0.02  # seconds between reads of the state a daemon writes

#: on_progress(name, phase, elapsed_s, detail): phase is "queued" (waiting for its
#: turn to load), "starting", "loading" or "healthy"
Progress = Callable[[str, str, float, str], None]


@dataclass
class UpResult:
    name: str
    outcome: str  # "started" | "already running" | "queued" (waiting for its turn to load)
    pid: int | None
    port: int
    healthy: bool = False
    error: str | None = None
    #: running with a command line that differs from what its config gives now
    stale: bool = False
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: queued: [k, n], load k of the n loading or waiting (`loads.max_concurrent`)
    load_position: list[int] | None = None


def exit_text(info: dict[str, Any]) -> str:
    """How a process ended, from a `last_exit` record, for people."""
    if info.get("signal"):
        return f"was killed by signal {info['signal']} ({platform.signal_name(info['signal'])})"
    if info.get("code") is not None:
        return f"exited with code {info['code']}"
    # Only a process's parent learns its exit code; an instance started by a
    # CLI that has since exited has no parent of ours (the daemon fixes that).
    return "exited (exit code unknown: llama-orch was not its parent)"


def ended(row: InstanceRow, info: dict[str, Any]) -> tuple[S, str, dict[str, Any]]:
    """How `row` records the end of its process, from `Engine.exit_info`
    (pure): the new state, the event's message, and the row's changes."""
    new = S.STOPPED if row.state == S.STOPPING else S.EXITED
    changes = {
        "exit_code": info["code"] if info["signal"] is None else -info["signal"],
        "exited_at": info["at"],
        "last_exit": info,
    }
    return new, f"process {row.pid} {exit_text(info)}", changes


def running_rm_refused(name: str) -> UserError:
    return UserError(
        f"Instance '{name}' is running.",
        hint=f"Stop it with `llama-orch down {name}` first, or use `rm --force`.",
    )


def _with_tail(message: str, lines: list[str]) -> str:
    if not lines:
        return message
    return message + " Last lines of its stderr:\n" + "\n".join(f"  | {ln}" for ln in lines)


class Engine:
    """Operations on the instances of one home."""

    def __init__(
        self,
        home: Home,
        *,
        clock: Callable[[], float] = time.time,
        get: health.Getter = health.http_get,
        base_env: dict[str, str] | None = None,
        find_gpus: Callable[[], Discovery] | None = None,
        supervisor: bool = False,
        unsaved: Unsaved | None = None,
    ) -> None:
        self.home = home
        self.is_supervisor = supervisor
        self._unsaved = unsaved  # the daemon's: what a full disk refused
        self._daemon_checked: tuple[float, bool] | None = None
        self.clock = clock
        self._store: Store | None = None
        self.get = get
        self._base_env = base_env
        self._find_gpus = find_gpus
        self._settings: Settings | None = None

    # --- lazily built adapters ---------------------------------------------

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store.open(self.home.db_path, self.clock, self._unsaved)
        return self._store

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            from llama_orchestrator.config import load_settings

            self._settings = load_settings(self.home.settings_path)
        return self._settings

    def find_gpus(self) -> Discovery:
        """The GPUs now (the discovery passed in, or the machine's)."""
        if self._find_gpus is None:
            from llama_orchestrator.gpu import discover

            self._find_gpus = discover
        return self._find_gpus()

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    def daemon_alive(self) -> bool:
        """Whether a daemon runs for this home (looked up at most once a second)."""
        if self.is_supervisor:
            return True
        now = time.monotonic()
        if self._daemon_checked is None or now - self._daemon_checked[0] > 1.0:
            self._daemon_checked = (now, daemon_lock_held(self.home))
        return self._daemon_checked[1]

    def owns(self, row: InstanceRow) -> bool:
        """May this engine record what it sees of `row`? Not while a daemon
        supervises it (unless this engine is that daemon's)."""
        return self.is_supervisor or not (row.supervised and self.daemon_alive())

    # --- names and configs ----------------------------------------------------

    def known_names(self) -> list[str]:
        """Instances with a config, plus any the store still tracks (not the
        external upstreams: nothing of them runs here)."""
        names = set(self.home.instance_names()) - set(self.upstreams())
        names.update(r.name for r in self.store.all())
        return sorted(names)

    def upstreams(self) -> dict[str, UpstreamConfig]:
        from llama_orchestrator.config.validate import upstream_configs

        return upstream_configs(self.home)

    def resolve_names(self, names: Iterable[str], all_: bool = False) -> list[str]:
        if all_:
            return self.known_names()
        known = self.known_names()
        out = []
        for n in names:
            check_name(n)
            if n not in known:
                if (up := self.upstreams().get(n)) is not None:
                    raise UserError(
                        f"'{n}' is an external upstream ({up.upstream.url}), not a llama-server: "
                        "there is nothing of it to start, stop, restart or read logs of.",
                        hint="`llama-orch ps` shows its state, `llama-orch usage` what it cost.",
                    )
                raise UnknownInstance(n, known)
            out.append(n)
        if not out:
            raise UserError("Name at least one instance.", hint="Or use --all.")
        return out

    def up_names(self, names: Iterable[str], all_: bool) -> tuple[list[str], list[str]]:
        """(what `up` starts, the on-demand instances it leaves to the router).
        `--all` leaves those to the first request; named ones start (asked for)."""
        targets = self.resolve_names(names, all_)
        if not all_:
            return targets, []
        from llama_orchestrator.config.validate import load_all

        lazy = {x.name for x in load_all(self.home) if x.config is not None and x.config.on_demand}
        return [t for t in targets if t not in lazy], sorted(lazy)

    def prepare(self, names: list[str], strict: bool = False) -> list[Prepared]:
        """Validate the named instances fully and build their launches (see
        engine.prepare); VRAM is checked against what runs now plus these."""
        from llama_orchestrator.config.prepare import prepare

        running = {
            r.name for r in self.store.all() if r.state in RUNNING_STATES and is_alive(self._ref(r))
        }
        base = dict(os.environ) if self._base_env is None else self._base_env
        # llama-server needs no upstream's key, and describe shows its environment
        from llama_orchestrator.upstreams import key_env_names

        hidden = key_env_names(self.upstreams())
        base = {k: v for k, v in base.items() if k not in hidden}
        leased = frozenset(x.gpu for x in self.store.leases())
        return prepare(self.home, names, running, base, self.find_gpus, strict, leased)

    # --- observation ----------------------------------------------------------

    def _ref(self, row: InstanceRow) -> ProcRef | None:
        return ProcRef.of(row.pid, row.create_time)

    def exit_info(self, row: InstanceRow) -> dict[str, Any]:
        """How the (dead) process of `row` ended: code or signal (when we were
        its parent), when, and the last lines of its stderr."""
        code = exit_code(row.pid) if row.pid else None
        sig = -code if code is not None and code < 0 else None
        tail = logs.server_lines(
            logs.log_file(self.home.log_dir(row.name), "stderr"), EXIT_TAIL_LINES
        )
        return {
            "code": None if sig else code,
            "signal": sig,
            "at": self.clock(),
            "stderr_tail": tail,
        }

    def orphans(self) -> list[tuple[str, ProcRef, list[str]]]:
        """Live processes marked as this home's instances that no row owns
        (a crash of ours between a spawn and its record): (instance, process,
        its command line)."""
        from llama_orchestrator.engine.process import marked_processes, same_process

        owned = [
            ref
            for r in self.store.all()
            if r.state in RUNNING_STATES and (ref := self._ref(r)) is not None
        ]
        out = []
        for name, p in marked_processes(str(self.home.root)):
            try:
                ref, argv = ProcRef(p.pid, p.create_time()), p.cmdline()
            except psutil.Error:
                continue
            if not any(same_process(ref, o) for o in owned):
                out.append((name, ref, argv))
        return out

    def record_found(self, name: str, ref: ProcRef, host: str, port: int) -> None:
        """Record an orphan (see `orphans`) as the instance's running process."""
        with self.store.transaction():
            row = self.store.get_or_new(name)
            self.store.set_state(
                row,
                S.STARTING,
                f"found process {ref.pid} running with no record of it "
                "(the daemon ended between its start and its record)",
                {"pid": ref.pid},
                desired=Desired.RUNNING,
                pid=ref.pid,
                create_time=ref.create_time,
                host=host,
                port=port,
                started_at=ref.create_time,
                exited_at=None,
                exit_code=None,
                supervised=self.is_supervisor,
                next_restart_at=None,
            )

    def is_running(self, name: str) -> bool:
        """Whether the instance's process runs now (whoever started it)."""
        row = self.store.get_or_new(name)
        return row.state in RUNNING_STATES and is_alive(self._ref(row))

    def observe(self, row: InstanceRow) -> InstanceRow:
        """Record the death of an instance whose process is gone."""
        if row.state not in RUNNING_STATES or not self.owns(row) or is_alive(self._ref(row)):
            return row
        info = self.exit_info(row)
        new, message, changes = ended(row, info)
        return self.store.set_state(row, new, message, info, **changes)

    def rows(self, names: list[str] | None = None) -> list[InstanceRow]:
        """Fresh runtime rows (dead processes recorded as such); logs of running
        instances are rotated on the way when over `logs.max_bytes`."""
        with self.store.transaction():
            wanted = names if names is not None else self.known_names()
            rows = [self.observe(self.store.get_or_new(n)) for n in wanted]
        for row in rows:
            if row.state in RUNNING_STATES:
                self.rotate_logs(row.name, row.started_at)
        return rows

    def rotate_logs(self, name: str, started_at: float | None) -> None:
        """Copy-truncate rotation: safe while the child writes (it appends), so
        whoever looks at an instance (ps, the dashboard, the daemon) rotates.
        The emptied log starts with when its process started (`started_at`),
        which its lines' times count from."""
        log_dir = self.home.log_dir(name)
        header = None if started_at is None else logs.start_line(started_at, rotated=True)
        for stream in logs.STREAMS:
            logs.rotate_if_needed(
                logs.log_file(log_dir, stream),
                self.settings.logs.max_bytes,
                self.settings.logs.backups,
                header,
            )

    # --- up -----------------------------------------------------------------

    def spawn(self, p: Prepared, fresh: bool = True) -> UpResult:
        """Start one instance unless its process already runs.

        `fresh`: a user's up/restart, which gives a failed instance its restart
        budget back; the daemon's own restarts keep the counts.

        The check and the spawn happen inside one BEGIN IMMEDIATE transaction:
        two `up` at the same moment serialise on SQLite's write lock, and the
        second one finds the first one's live process."""
        store = self.store
        with store.transaction():
            row = self.observe(store.get_or_new(p.name))
            s = p.config.server
            running = find(self._ref(row))
            if running is not None:
                if row.desired != Desired.RUNNING or row.supervised != self.is_supervisor:
                    if self.is_supervisor and not row.supervised:
                        store.add_event(
                            p.name, "supervised", f"daemon supervises process {row.pid}"
                        )
                    row.desired = Desired.RUNNING
                    row.supervised = row.supervised or self.is_supervisor
                    store.save(row)
                try:
                    stale = running.cmdline() != p.launch.argv
                except Exception:  # psutil may be refused another user's cmdline
                    stale = False
                return UpResult(p.name, "already running", row.pid, s.port, stale=stale)
            if not platform.port_is_free(s.host, s.port):
                raise PortConflict(
                    f"Port {s.port} on {s.host} is already in use by another program, "
                    f"so instance '{p.name}' cannot listen there.",
                    hint=f"Stop that program or change server.port in {p.config_path}.",
                )
            log_dir = self.home.log_dir(p.name)
            started_at = self.clock()
            try:
                private_dir(self.home.logs_dir)
                log_dir.mkdir(exist_ok=True)
                paths = {st: logs.log_file(log_dir, st) for st in logs.STREAMS}
                self.rotate_logs(p.name, None)
                with open(paths["stdout"], "ab") as out, open(paths["stderr"], "ab") as err:
                    for f in (out, err):  # when this run's lines count from (LineTimes)
                        f.write(logs.start_line(started_at).encode() + b"\n")
                        f.flush()
                    proc = platform.spawn(
                        p.launch.argv, p.launch.env, p.config_path.parent, out, err
                    )
            except OSError as exc:
                if is_disk_full(exc):  # no log, no start: a server we could not follow
                    raise disk_full(log_dir, f"The logs of instance '{p.name}'") from exc
                raise StartFailed(
                    f"Instance '{p.name}' could not be started: {exc.strerror or exc} "
                    f"({p.launch.argv[0]})."
                ) from exc
            track_child(proc)
            try:
                ct = create_time_of(proc.pid)
            except Exception:  # already gone: record it with a time that matches nothing
                ct = 0.0
            store.set_state(
                row,
                S.STARTING,
                f"started process {proc.pid} on port {s.port}",
                {"pid": proc.pid, "port": s.port},
                desired=Desired.RUNNING,
                pid=proc.pid,
                create_time=ct,
                host=s.host,
                port=s.port,
                gpu_devices=p.devices,
                started_at=started_at,
                exited_at=None,
                exit_code=None,
                supervised=self.is_supervisor,
                next_restart_at=None,
                config_digest=p.config.digest(),
                **({"restarts": 0, "streak": 0} if fresh else {}),
            )
            return UpResult(p.name, "started", proc.pid, s.port)

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
        prepared = self.prepare(names, strict)
        results = [self.spawn(p) for p in prepared]
        for p, r in zip(prepared, results, strict=True):
            r.warnings, r.notes = p.warnings, p.notes
        if wait:
            self.wait_healthy(results, timeout, on_progress)
        failed = [r for r in results if r.error]
        if failed:
            raise StartFailed("\n".join(r.error for r in failed if r.error))
        return results

    def wait_healthy(
        self, results: list[UpResult], timeout: float, on_progress: Progress | None = None
    ) -> None:
        """Wait until each instance is healthy, died, or `timeout` passed; set
        `error` on the results that did not make it. An instance a daemon
        supervises is healthy when the daemon says so; others are probed here."""
        configs: dict[str, InstanceConfig] = {}  # read only when this engine probes
        watches: dict[str, Watch] = {}  # the health step's memory, per instance it owns
        start = time.monotonic()
        pending = {r.name: r for r in results}
        while pending:
            elapsed = time.monotonic() - start
            probed = False
            for name, res in list(pending.items()):
                row = self.observe(self.store.get_or_new(name))
                if row.state == S.QUEUED and res.pid is None:  # the daemon loads others first
                    if on_progress:
                        on_progress(name, "queued", elapsed, "waiting for its turn to load")
                    continue
                if res.pid is None and row.state in RUNNING_STATES:  # its turn came
                    res.pid, res.outcome = row.pid, "started"
                if row.state not in RUNNING_STATES or row.pid != res.pid:
                    res.error = self._death_message(name, row)
                    del pending[name]
                    continue
                if self.owns(row):
                    probed = True
                    if not configs:
                        from llama_orchestrator.config.validate import load_all

                        configs = {x.name: x.config for x in load_all(self.home) if x.config}
                    cfg = configs[name]
                    probe = health.probe(
                        cfg.server.host,
                        cfg.server.port,
                        min(cfg.healthcheck.timeout, 2.0),
                        self.get,
                    )
                    now = self.clock()
                    s = step(
                        row.state,
                        row.desired,
                        row.started_at,
                        watches.setdefault(name, Watch(since=now)),
                        probe,
                        cfg.healthcheck,
                        cfg.restart_policy.effective_mode,  # its `restart` is not acted on here
                        now,
                        logs.load_progress(self.home.log_dir(name), activity(self._ref(row)))
                        if probe.status == health.LOADING
                        else None,
                    )
                    watches[name] = s.watch
                    if s.state != row.state:
                        self.store.set_state(row, s.state, s.reason, {"probe": probe.to_json()})
                    healthy, loading = s.healthy, probe.status == health.LOADING
                else:
                    healthy, loading = row.state == S.HEALTHY, row.state == S.STARTING
                if healthy:
                    res.healthy = True
                    del pending[name]
                    if on_progress:
                        on_progress(name, "healthy", elapsed, "")
                elif on_progress:
                    on_progress(
                        name, "loading" if loading else "starting", elapsed, self._said(name)
                    )
            if not pending:
                break
            if elapsed >= timeout:
                for name, res in pending.items():
                    if res.pid is None:
                        res.error = (
                            f"Instance '{name}' was still waiting for its turn to load after "
                            f"{timeout:g}s (loads.max_concurrent); the daemon starts it when the "
                            "models before it have loaded. Raise --timeout to wait for it."
                        )
                        continue
                    tail = logs.server_lines(logs.log_file(self.home.log_dir(name), "stderr"), 10)
                    res.error = _with_tail(
                        f"Instance '{name}' was not healthy within {timeout:g}s; it keeps "
                        f"starting in the background. See `llama-orch logs {name}`, or raise --timeout.",
                        tail,
                    )
                break
            time.sleep(POLL_INTERVAL if probed else STATE_POLL_INTERVAL)

    def _said(self, name: str) -> str:
        """What a starting server said last: its load progress while llama.cpp
        prints its dots, else its last line."""
        log_dir = self.home.log_dir(name)
        percent = logs.load_progress(log_dir).percent
        if percent is not None and percent < 100:
            return f"{percent}% of the model read"
        last = logs.server_lines(logs.log_file(log_dir, "stderr"), 1)
        return last[0] if last else ""

    def _death_message(self, name: str, row: InstanceRow) -> str:
        info = row.last_exit or {}
        message = f"Instance '{name}' {exit_text(info)} while starting."
        if row.state == S.BACKOFF and row.next_restart_at is not None:
            wait = max(0.0, row.next_restart_at - self.clock())
            message += f" The daemon tries again in {wait:.1f}s (restart {row.restarts})."
        elif row.state in RUNNING_STATES:
            message += f" The daemon restarted it (restart {row.restarts}, pid {row.pid})."
        elif row.state == S.FAILED:
            message += f" It failed {row.restarts} restarts in a row; the daemon gave up."
        return _with_tail(message, (info.get("stderr_tail") or [])[-10:])

    # --- down / restart / rm ----------------------------------------------------

    def down(self, names: list[str], timeout: float | None = None) -> list[str]:
        """Stop the named instances; return only when no process of theirs lives."""
        from llama_orchestrator.config.validate import load_all

        to_stop: list[tuple[InstanceRow, float]] = []
        loaded = {x.name: x.config for x in load_all(self.home)}
        with self.store.transaction():
            for name in names:
                row = self.observe(self.store.get_or_new(name))
                row.desired = Desired.STOPPED
                if is_alive(self._ref(row)):
                    cfg = loaded.get(name)
                    grace = timeout if timeout is not None else (cfg.stop_timeout if cfg else 10.0)
                    self.store.set_state(row, S.STOPPING, f"stopping process {row.pid}")
                    to_stop.append((row, grace))
                else:
                    new = S.STOPPED if row.state != S.CREATED else S.CREATED
                    self.store.set_state(row, new, "stopped")
        from concurrent.futures import ThreadPoolExecutor  # ~17 ms: only when stopping

        with ThreadPoolExecutor(max_workers=max(1, len(to_stop))) as pool:
            graceful = list(pool.map(lambda rg: self._stop_one(*rg), to_stop))
        for (row, grace), ok in zip(to_stop, graceful, strict=True):
            code = exit_code(row.pid) if row.pid else None
            how = "stopped" if ok else f"killed after {grace:g}s without exiting"
            self.store.set_state(
                row,
                S.STOPPED,
                f"process {row.pid} {how}",
                {"graceful": ok},
                exited_at=self.clock(),
                exit_code=code,
            )
        return [row.name for row, _ in to_stop]

    def _stop_one(self, row: InstanceRow, grace: float) -> bool:
        ref = self._ref(row)
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
        self.prepare(names)  # refuse a broken config before stopping a working server
        self.down(names)
        return self.up(names, timeout=timeout, on_progress=on_progress)

    def rm(self, name: str, force: bool = False) -> None:
        """Remove an instance: its config folder, logs and state."""
        row = self.observe(self.store.get_or_new(name))
        if is_alive(self._ref(row)):
            if not force:
                raise running_rm_refused(name)
            self.down([name])
        self.forget(name)

    def forget(self, name: str) -> None:
        """Delete an instance's state, config folder and logs (it runs no more)."""
        import shutil

        with self.store.transaction():
            self.store.delete(name)
            self.store.add_event(name, "removed", f"instance {name} removed")
        for folder in (self.home.instance_dir(name), self.home.log_dir(name)):
            shutil.rmtree(folder, ignore_errors=True)

    def status(self) -> StatusReply:
        """What `ps` shows: every instance's status view, and card warnings."""
        from llama_orchestrator.engine import views
        from llama_orchestrator.engine.status import StatusReply, collect

        return StatusReply(collect(self), views.pinned_gpu_warnings(self))

    def activity(self) -> Activity:
        from llama_orchestrator.engine.status import Activity

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

    # --- health -------------------------------------------------------------------

    def probe(self, name: str) -> health.ProbeResult:
        from llama_orchestrator.config.validate import load_all

        row = self.rows([name])[0]
        loaded = {x.name: x for x in load_all(self.home)}
        cfg = loaded[name].config if name in loaded else None
        from llama_orchestrator.engine.status import listening

        host, port = listening(row, cfg)
        if port is None or not is_alive(self._ref(row)):
            return health.ProbeResult(health.DOWN, None, 0.0, f"instance is {row.state}")
        timeout = cfg.healthcheck.timeout if cfg else 5.0
        return health.probe(host, port, timeout, self.get)
