"""The state database: one connection per Store, WAL, BEGIN IMMEDIATE for
read-then-write, typed rows in and out (see the package's docstring)."""

from __future__ import annotations

import copy
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llama_orchestrator.errors import DiskFull, StateError
from llama_orchestrator.files import disk_full, is_disk_full, private_dir
from llama_orchestrator.states import InstanceState, is_allowed
from llama_orchestrator.store.rows import (
    COLUMNS,
    INSERT_EVENT,
    Event,
    InstanceRow,
    Lease,
    UsageRecord,
    save_sql,
)
from llama_orchestrator.store.schema import MIGRATIONS, SCHEMA_VERSION
from llama_orchestrator.store.unsaved import Unsaved, Write

__all__ = ["Store", "reset_state", "damaged"]

log = logging.getLogger("llama_orchestrator.daemon")


class Store:
    """Typed access to the state database. Open with `Store.open(path)`;
    `unsaved` (the daemon's) keeps what a full disk refuses instead of failing."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        clock: Callable[[], float],
        unsaved: Unsaved | None = None,
    ) -> None:
        self._conn = conn
        self.path = path
        self.clock = clock
        self.unsaved = unsaved
        #: the writes of the transaction under way, and the full-disk error it met
        self._writes: list[Write] | None = None
        self._full: DiskFull | None = None  # rows and events are only kept, not written
        self._failed = False  # a write of this transaction failed (SQLite may have undone it)
        self._raw = False  # it wrote other tables (`execute`)
        #: on_event(instance, kind, message, data) after each event is added (the daemon logs them)
        self.on_event: Callable[[str | None, str, str, dict[str, Any]], None] | None = None

    @classmethod
    def open(
        cls, path: Path, clock: Callable[[], float] = time.time, unsaved: Unsaved | None = None
    ) -> Store:
        try:
            private_dir(path.parent)
            if path.is_file() and path.stat().st_size == 0 and not _new(path):
                # SQLite would take it for a new database: a history lost in silence
                raise damaged(path, "the file is empty (0 bytes): its history is gone")
            conn = sqlite3.connect(path, timeout=15, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout = 15000")
            _enable_wal(conn)
            conn.execute("PRAGMA synchronous = FULL")
            store = cls(conn, path, clock, unsaved)
            store._migrate()
            return store
        except (sqlite3.Error, OSError) as exc:
            raise _state_error(path, exc) from exc

    def close(self) -> None:
        self._conn.close()

    def _migrate(self) -> None:
        with self.transaction():
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StateError(
                    f"The state database {self.path} was written by a newer llama-orch "
                    f"(schema {version}, this one knows {SCHEMA_VERSION}).",
                    hint="Upgrade llama-orch.",
                )
            for i in range(version, SCHEMA_VERSION):
                for stmt in MIGRATIONS[i].split(";"):
                    if stmt.strip():
                        self._conn.execute(stmt)
                self._conn.execute(f"PRAGMA user_version = {i + 1}")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT; nested use joins the outer transaction.
        With `unsaved`, the rows and events of a transaction the full disk
        refuses are kept in memory and it ends quietly; rows and events also
        queue behind those kept before, in order, until those are written.
        (Other writes are never kept: their callers get the error.)"""
        if self._writes is not None or self._conn.in_transaction:
            yield
            return
        behind = self.unsaved is not None and not self.flush()
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _state_error(self.path, exc) from exc
        self._writes, self._raw, self._failed = [], False, False
        self._full = self.unsaved.error if behind and self.unsaved is not None else None
        try:
            try:
                yield
            except BaseException:
                self._rollback()
                raise
            writes, full, raw, refused = self._writes, self._full, self._raw, self._failed
            if refused:
                self._rollback()
            else:
                try:
                    self._conn.execute("COMMIT")
                except sqlite3.Error as exc:
                    self._rollback()
                    error = _state_error(self.path, exc)
                    if not isinstance(error, DiskFull) or self.unsaved is None:
                        raise error from exc
                    full, refused = error, True
        finally:
            self._writes, self._full = None, None
        if full is None:
            if self.unsaved is not None:
                for kind, value in writes:
                    if kind == "row":
                        self.unsaved.saved(value.name)
            return
        assert self.unsaved is not None
        self.unsaved.keep(writes, full, self.clock())
        if raw and refused:
            raise full  # what the other tables' writers asked for is not written

    def _rollback(self) -> None:
        if self._conn.in_transaction:  # SQLite may have rolled back itself (a full disk)
            self._conn.execute("ROLLBACK")

    def flush(self) -> bool:
        """Write what a full disk refused before; whether all of it is written now."""
        unsaved = self.unsaved
        if not unsaved:
            return True
        rows, events = unsaved.snapshot()
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            for row in rows.values():
                self._conn.execute(*save_sql(row))
            for event in events:
                self._conn.execute(INSERT_EVENT, event)
            self._conn.execute("COMMIT")
        except sqlite3.Error:
            self._rollback()
            return False
        unsaved.written(rows, len(events), self.clock())
        return not unsaved

    def _write(self, sql: str, params: tuple[Any, ...], kept: Write) -> None:
        """A write of a row or an event: inside a transaction, kept in case
        the disk refuses it (and, once it has, the rest are only kept)."""
        assert self._writes is not None
        self._writes.append(kept)
        if self._full is not None:
            return
        try:
            self._conn.execute(sql, params)
        except sqlite3.Error as exc:
            error = _state_error(self.path, exc)
            if not isinstance(error, DiskFull) or self.unsaved is None:
                raise error from exc
            self._full, self._failed = error, True

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        """Raw SQL for the other tables' own modules (plans.records)."""
        self._raw = True
        return self._exec(sql, params)

    def _exec(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        try:
            return self._conn.execute(sql, params)
        except sqlite3.Error as exc:
            raise _state_error(self.path, exc) from exc

    # --- instances -----------------------------------------------------------

    def get(self, name: str) -> InstanceRow | None:
        kept = self._kept(name)
        if kept is not None:
            return kept
        r = self._exec("SELECT * FROM instances WHERE name = ?", (name,)).fetchone()
        return InstanceRow.from_sql(r) if r else None

    def _kept(self, name: str) -> InstanceRow | None:
        """The row as written in this transaction or kept from a full disk,
        newest first (None: the disk's row is the newest)."""
        if self._full is not None:
            assert self._writes is not None
            for kind, value in reversed(self._writes):
                if kind == "row" and value.name == name:
                    return copy.deepcopy(value)
        return self.unsaved.row(name) if self.unsaved else None

    def get_or_new(self, name: str) -> InstanceRow:
        return self.get(name) or InstanceRow(name=name)

    def all(self) -> list[InstanceRow]:
        rows = {
            r["name"]: InstanceRow.from_sql(r)
            for r in self._exec("SELECT * FROM instances ORDER BY name").fetchall()
        }
        kept = [*(self.unsaved.rows() if self.unsaved else [])]
        if self._full is not None:
            assert self._writes is not None
            kept += [copy.deepcopy(v) for k, v in self._writes if k == "row"]
        for row in kept:
            rows[row.name] = row
        return [rows[name] for name in sorted(rows)]

    def save(self, row: InstanceRow) -> None:
        """Write the row; `last_used_at` only `mark_used` writes (the router's
        clock must not be set back by a row read a moment earlier)."""
        row.updated_at = self.clock()
        with self.transaction():
            self._write(*save_sql(row), ("row", copy.deepcopy(row)))

    def mark_used(self, used: dict[str, float]) -> None:
        """When each named on-demand instance last served a request."""
        with self.transaction():
            for name, ts in used.items():
                self._exec("UPDATE instances SET last_used_at = ? WHERE name = ?", (ts, name))

    def delete(self, name: str) -> None:
        self._exec("DELETE FROM instances WHERE name = ?", (name,))
        if self.unsaved is not None:
            self.unsaved.saved(name)

    def set_state(
        self,
        row: InstanceRow,
        new: InstanceState,
        message: str,
        data: dict[str, Any] | None = None,
        **changes: Any,
    ) -> InstanceRow:
        """The one way a state changes: check the transition, apply `changes`,
        save the row and record the event, all in one transaction."""
        if not is_allowed(row.state, new):
            raise StateError(f"Instance {row.name}: illegal transition {row.state} -> {new}.")
        old = row.state
        for key, value in changes.items():
            if key not in COLUMNS:
                raise TypeError(f"unknown column {key}")
            setattr(row, key, value)
        row.state = new
        with self.transaction():
            self.save(row)
            if old != new or data:
                self.add_event(row.name, new.value, message, {"from": old.value, **(data or {})})
        return row

    # --- events --------------------------------------------------------------

    def add_event(
        self, instance: str | None, kind: str, message: str, data: dict[str, Any] | None = None
    ) -> None:
        event = (self.clock(), instance, kind, message, json.dumps(data or {}))
        with self.transaction():
            self._write(INSERT_EVENT, event, ("event", event))
        if self.on_event is not None:
            self.on_event(instance, kind, message, data or {})

    def events(
        self,
        instance: str | None = None,
        since: float | None = None,
        after_id: int = 0,
        limit: int | None = None,
    ) -> list[Event]:
        sql = "SELECT * FROM events WHERE id > ?"
        params: list[Any] = [after_id]
        if instance is not None:
            sql += " AND instance = ?"
            params.append(instance)
        if since is not None:
            sql += " AND ts >= ?"
            params.append(since)
        if limit is not None:  # the newest `limit`, still returned oldest first
            sql = f"SELECT * FROM ({sql} ORDER BY id DESC LIMIT ?) ORDER BY id"
            params.append(limit)
        else:
            sql += " ORDER BY id"
        return self._events(sql, tuple(params))

    def mark_gpus_seen(self, cards: list[tuple[str, int, str]]) -> None:
        """Remember (backend, index, name) of cards discovery reports now."""
        if not cards:
            return
        with self.transaction():
            for backend, idx, name in cards:
                self._exec(
                    "INSERT INTO gpus_seen (backend, idx, name, seen_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (backend, idx) DO UPDATE SET name = excluded.name, "
                    "seen_at = excluded.seen_at",
                    (backend, idx, name, self.clock()),
                )

    def leases(self) -> list[Lease]:
        """Every card leased to a plan's script task, by index."""
        rows = self._exec("SELECT * FROM gpu_leases ORDER BY gpu").fetchall()
        return [
            Lease(
                r["gpu"],
                r["run_id"],
                r["task_id"],
                r["since"],
                r["state"],
                json.loads(r["yielded"]),
            )
            for r in rows
        ]

    def save_leases(self, leases: list[Lease]) -> None:
        """Record (or update) these leases, all in one transaction."""
        with self.transaction():
            for x in leases:
                self._exec(
                    "INSERT INTO gpu_leases (gpu, run_id, task_id, since, state, yielded) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (gpu) DO UPDATE SET "
                    "run_id = excluded.run_id, task_id = excluded.task_id, "
                    "since = excluded.since, state = excluded.state, yielded = excluded.yielded",
                    (x.gpu, x.run_id, x.task_id, x.since, x.state, json.dumps(x.yielded)),
                )

    def drop_leases(self, gpus: list[int]) -> None:
        with self.transaction():
            for gpu in gpus:
                self._exec("DELETE FROM gpu_leases WHERE gpu = ?", (gpu,))

    def add_usage(self, records: list[UsageRecord]) -> None:
        """What requests to upstreams cost, all in one transaction."""
        with self.transaction():
            for u in records:
                self.execute(
                    "INSERT INTO usage (ts, upstream, model, run_id, task_id, tokens_in, "
                    "tokens_out, cost) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        u.ts,
                        u.upstream,
                        u.model,
                        u.run_id,
                        u.task_id,
                        u.tokens_in,
                        u.tokens_out,
                        u.cost,
                    ),
                )

    def usage(self, since: float = 0.0) -> list[UsageRecord]:
        rows = self._exec("SELECT * FROM usage WHERE ts >= ? ORDER BY id", (since,)).fetchall()
        return [
            UsageRecord(
                r["ts"],
                r["upstream"],
                r["model"],
                r["run_id"],
                r["task_id"],
                r["tokens_in"],
                r["tokens_out"],
                r["cost"],
            )
            for r in rows
        ]

    def gpus_seen(self) -> set[int]:
        """Indices of every card discovery has ever reported in this home."""
        return {r["idx"] for r in self._exec("SELECT idx FROM gpus_seen").fetchall()}

    def latest_of_kinds(self, kinds: tuple[str, ...], limit: int = 500) -> list[Event]:
        """The newest events of these kinds, newest first."""
        marks = ", ".join("?" for _ in kinds)
        sql = f"SELECT * FROM events WHERE kind IN ({marks}) ORDER BY id DESC LIMIT ?"
        return self._events(sql, (*kinds, limit))

    def _events(self, sql: str, params: tuple[Any, ...]) -> list[Event]:
        rows = self._exec(sql, params).fetchall()
        return [
            Event(r["id"], r["ts"], r["instance"], r["kind"], r["message"], json.loads(r["data"]))
            for r in rows
        ]


def _enable_wal(conn: sqlite3.Connection, timeout: float = 15.0) -> None:
    """Switch a new database to WAL (a no-op once it is).

    The switch needs an exclusive lock, and SQLite answers "database is locked"
    at once, without its busy handler, while another process is creating the
    same database (seen with two `up` at the same moment). So: retry briefly."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


#: SQLite's own result codes (sqlite3.Error.sqlite_errorcode on Python 3.11+)
_FULL, _CORRUPT, _NOTADB, _BUSY, _LOCKED = 13, 11, 26, 5, 6


def _state_error(path: Path, exc: BaseException) -> StateError:
    """Which fault it is, in words, and its fix: a damaged file is not a full disk."""
    detail = str(exc) or type(exc).__name__
    code = getattr(exc, "sqlite_errorcode", None)
    code = code & 0xFF if isinstance(code, int) else None  # extended codes share the low byte
    text = detail.lower()
    if path.is_dir():
        why = "it is a directory, not a database file"
        fix = f"Move {path} aside and run the command again."
    elif code in (_CORRUPT, _NOTADB) or "malformed" in text or "not a database" in text:
        return damaged(path, detail)
    elif code == _FULL or "disk is full" in text or is_disk_full(exc):
        return disk_full(path, f"The state database {path}")
    elif code in (_BUSY, _LOCKED) or "locked" in text or "busy" in text:
        why = "another llama-orch process held it for too long"
        fix = "Run the command again."
    else:
        why = detail
        fix = f"Check that {path.parent} exists and is writable."
    return StateError(f"The state database {path} cannot be used: {why}.", hint=fix)


def damaged(path: Path, what: str) -> StateError:
    return StateError(
        f"The state database {path} is damaged ({what}); nothing was changed.",
        hint="`llama-orch daemon start --reset-state` keeps it aside "
        f"({path.name}.corrupt-<time>) and starts a fresh one; it finds the llama-server "
        "processes still running by their marker, and adopts or stops them.",
    )


def reset_state(path: Path, now: float) -> Path | None:
    """Move the database (and its -wal, -shm) aside as `<name>.corrupt-<time>`,
    so the next open starts a fresh one; where it went, or None if there was none."""
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    kept = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        src = path.with_name(path.name + suffix)
        if src.exists():
            os.replace(src, kept.with_name(kept.name + suffix))
    return kept


def _new(path: Path) -> bool:
    """An empty file that a process is creating right now (opened, not yet
    written: the first open writes within milliseconds) is not a lost history."""
    return time.time() - path.stat().st_mtime < 5.0
