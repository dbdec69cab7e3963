"""One home's session: its store, settings and GPUs, its instances' names
and checked launches, what is seen of their processes, and the launch
primitives (`spawn`, `forget`) that both the daemon and the daemonless
control (`engine.unsupervised`) act through.

It works on SQLite + processes directly. Decisions live in pure modules
(command, step, policy, results, states); this module wires them to I/O.

Ownership: while a daemon runs, it alone writes the state of the instances it
supervises (`row.supervised`); other engines (`supervisor=False`) read those
rows and leave them alone. Without a daemon, whoever looks records what it sees.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import psutil

from llama_orchestrator import platform
from llama_orchestrator.engine import health, logs
from llama_orchestrator.engine.process import (
    ProcRef,
    create_time_of,
    exit_code,
    find,
    is_alive,
    port_owner,
    track_child,
)
from llama_orchestrator.engine.results import EXIT_TAIL_LINES, UpResult, ended, started
from llama_orchestrator.errors import PortConflict, Problem, StartFailed, UnknownInstance, UserError
from llama_orchestrator.files import disk_full, is_disk_full, private_dir
from llama_orchestrator.home import Home, check_name, daemon_lock_held
from llama_orchestrator.states import RUNNING_STATES, Desired
from llama_orchestrator.states import InstanceState as S
from llama_orchestrator.store.database import Store
from llama_orchestrator.store.rows import InstanceRow
from llama_orchestrator.store.unsaved import Unsaved

if TYPE_CHECKING:
    # Imported where used: a command talking to the daemon (`up`, `down`)
    # never reads a config, and pydantic's import alone is ~60 ms of every run.
    from llama_orchestrator.config.prepare import Prepared
    from llama_orchestrator.config.settings import Settings
    from llama_orchestrator.config.upstream import UpstreamConfig
    from llama_orchestrator.gpus.discover import Discovery

__all__ = ["Engine"]


class Engine:
    """One home's session: what is there, and the launch primitives."""

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
        lenient_settings: bool = False,
    ) -> None:
        self.home = home
        #: what is wrong with llama-orch.json, read leniently (for commands that
        #: only look): its faults are left at their defaults and listed here
        self.lenient_settings = lenient_settings
        self.settings_problems: list[Problem] = []
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
            from llama_orchestrator.config.parse import load_settings, load_settings_leniently

            if self.lenient_settings:
                found = load_settings_leniently(self.home.settings_path)
                self._settings, self.settings_problems = found
            else:
                self._settings = load_settings(self.home.settings_path)
        return self._settings

    def find_gpus(self) -> Discovery:
        """The GPUs now (the discovery passed in, or the machine's)."""
        if self._find_gpus is None:
            from llama_orchestrator.gpus.discover import discover

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
        supervises it (unless this engine is that daemon's); never when its
        process runs on a cluster node (only the daemon sees those)."""
        if row.node is not None:
            return False
        return self.is_supervisor or not (row.supervised and self.daemon_alive())

    # --- names and configs ----------------------------------------------------

    def known_names(self) -> list[str]:
        """Instances with a config, plus any the store still tracks (not the
        external upstreams: nothing of them runs here)."""
        names = set(self.home.instance_names()) - self.home.upstream_names()
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
                if n in self.home.upstream_names():
                    up = self.upstreams().get(n)  # None: its config does not parse
                    where = f" ({up.upstream.url})" if up is not None else ""
                    raise UserError(
                        f"'{n}' is an external upstream{where}, not a llama-server: "
                        "there is nothing of it to start, stop, restart or read logs of.",
                        hint="`llama-orch ps` shows its state, `llama-orch usage` what it cost.",
                    )
                raise UnknownInstance(n, known)
            out.append(n)
        if not out:
            raise UserError("Name at least one instance.", hint="Or use --all.")
        return out

    def needs_daemon(self) -> bool:
        """Whether the home has work for a daemon: an instance wanted running,
        an on-demand one or an upstream (the router serves those)."""
        from llama_orchestrator.config.validate import load_all

        if any(r.desired == Desired.RUNNING for r in self.store.all()):
            return True
        return any(x.upstream or (x.config and x.config.on_demand) for x in load_all(self.home))

    def up_names(self, names: Iterable[str], all_: bool) -> tuple[list[str], list[str]]:
        """(what `up` starts, the on-demand instances it leaves to the router).
        `--all` leaves those to the first request; named ones start (asked for)."""
        targets = self.resolve_names(names, all_)
        if not all_:
            return targets, []
        from llama_orchestrator.config.validate import load_all

        lazy = {x.name for x in load_all(self.home) if x.config is not None and x.config.on_demand}
        return [t for t in targets if t not in lazy], sorted(lazy)

    def prepare(
        self, names: list[str], strict: bool = False, cluster: bool = False
    ) -> list[Prepared]:
        """Validate the named instances fully and build their launches (see
        engine.prepare); VRAM is checked against what runs now plus these.
        `cluster`: they run on a cluster's nodes, whose cards Ray's ledger
        counts; nothing of this machine's is looked at."""
        from llama_orchestrator.config.prepare import prepare

        if cluster:
            return prepare(self.home, names, set(), {}, self.find_gpus, strict, cluster=True)

        running = {
            r.name for r in self.store.all() if r.state in RUNNING_STATES and is_alive(self.ref(r))
        }
        base = dict(os.environ) if self._base_env is None else self._base_env
        # llama-server needs no upstream's key, and describe shows its environment
        from llama_orchestrator.upstreams import key_env_names

        hidden = key_env_names(self.upstreams())
        base = {k: v for k, v in base.items() if k not in hidden}
        leased = frozenset(x.gpu for x in self.store.leases())
        return prepare(self.home, names, running, base, self.find_gpus, strict, leased)

    # --- observation ----------------------------------------------------------

    def ref(self, row: InstanceRow) -> ProcRef | None:
        """The process `row` records (None: none)."""
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
            if r.state in RUNNING_STATES and (ref := self.ref(r)) is not None
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
        return row.state in RUNNING_STATES and is_alive(self.ref(row))

    def observe(self, row: InstanceRow) -> InstanceRow:
        """Record the death of an instance whose process is gone."""
        if row.state not in RUNNING_STATES or not self.owns(row) or is_alive(self.ref(row)):
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

    def _port_taken(self, p: Prepared, host: str, port: int) -> PortConflict:
        """Who holds the port an instance needs: llama-orch's own instance of
        another home is named, with the command that stops it."""
        owner = port_owner(port)
        if owner is None:
            return PortConflict(
                f"Port {port} on {host} is already in use by another program, "
                f"so instance '{p.name}' cannot listen there.",
                hint=f"Stop that program or change server.port in {p.config_path}.",
            )
        home, name = owner
        return PortConflict(
            f"Port {port} on {host} is already in use by instance '{name}' of the llama-orch "
            f"home {home}, so instance '{p.name}' cannot listen there.",
            hint=f"Stop it (`llama-orch --home {home} down {name}`) or change server.port "
            f"in {p.config_path}.",
        )

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
            running = find(self.ref(row))
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
                raise self._port_taken(p, s.host, s.port)
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
            state, message, data, changes = started(
                proc.pid,
                ct,
                s.host,
                s.port,
                started_at,
                supervised=self.is_supervisor,
                devices=p.devices,
                digest=p.config.digest(),
                fresh=fresh,
            )
            store.set_state(row, state, message, data, **changes)
            return UpResult(p.name, "started", proc.pid, s.port)

    def forget(self, name: str) -> None:
        """Delete an instance's state, config folder and logs (it runs no more)."""
        import shutil

        with self.store.transaction():
            self.store.delete(name)
            self.store.add_event(name, "removed", f"instance {name} removed")
        for folder in (self.home.instance_dir(name), self.home.log_dir(name)):
            shutil.rmtree(folder, ignore_errors=True)
