import sqlite3
import threading

import pytest

from llama_orchestrator.errors import StateError
from llama_orchestrator.states import Desired
from llama_orchestrator.states import InstanceState as S
from llama_orchestrator.store import SCHEMA_VERSION, InstanceRow, Store


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_store_creates_schema_in_wal_mode(tmp_path):
    store = Store.open(tmp_path / "state" / "state.sqlite")
    conn = sqlite3.connect(tmp_path / "state" / "state.sqlite")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
    Store.open(tmp_path / "state" / "state.sqlite").close()  # reopening migrates nothing twice


def test_set_state_saves_row_and_records_event(tmp_path):
    clock = Clock()
    store = Store.open(tmp_path / "s.sqlite", clock)
    row = store.get_or_new("a")
    store.set_state(row, S.STARTING, "started", {"pid": 5}, pid=5, desired=Desired.RUNNING)
    clock.t = 1001
    store.set_state(row, S.HEALTHY, "ok")
    got = store.get("a")
    assert (
        got is not None
        and got.state == S.HEALTHY
        and got.pid == 5
        and got.desired == Desired.RUNNING
    )
    events = store.events("a")
    assert [(e.ts, e.kind, e.data.get("from")) for e in events] == [
        (1000, "starting", "created"),
        (1001, "healthy", "starting"),
    ]
    assert events[0].data["pid"] == 5


def test_set_state_refuses_an_illegal_transition(tmp_path):
    store = Store.open(tmp_path / "s.sqlite")
    row = store.get_or_new("a")
    with pytest.raises(StateError, match="illegal transition created -> healthy"):
        store.set_state(row, S.HEALTHY, "no")
    assert store.get("a") is None


def test_events_filter_by_instance_time_and_limit(tmp_path):
    clock = Clock(0)
    store = Store.open(tmp_path / "s.sqlite", clock)
    for i in range(5):
        clock.t = i
        store.add_event("a" if i % 2 == 0 else "b", "k", f"m{i}")
    assert [e.message for e in store.events("a")] == ["m0", "m2", "m4"]
    assert [e.message for e in store.events(since=3)] == ["m3", "m4"]
    assert [e.message for e in store.events(limit=2)] == ["m3", "m4"]
    first = store.events()[0]
    assert [e.message for e in store.events(after_id=first.id)][0] == "m1"


def test_failed_transaction_leaves_nothing(tmp_path):
    store = Store.open(tmp_path / "s.sqlite")
    with pytest.raises(RuntimeError), store.transaction():
        store.add_event("a", "k", "m")
        raise RuntimeError("boom")
    assert store.events() == []


def test_a_directory_in_place_of_the_database_is_a_clear_error(tmp_path):
    path = tmp_path / "state.sqlite"
    path.mkdir()
    with pytest.raises(StateError, match="it is a directory") as info:
        Store.open(path)
    assert "Move" in str(info.value)


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "s.sqlite"
    Store.open(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(StateError, match="newer llama-orch"):
        Store.open(path)


def test_concurrent_read_then_write_transactions_serialise(tmp_path):
    """Two connections incrementing one counter under BEGIN IMMEDIATE lose no update."""
    path = tmp_path / "s.sqlite"
    Store.open(path).close()

    def bump(n: int) -> None:
        store = Store.open(path)
        for _ in range(n):
            with store.transaction():
                row = store.get_or_new("a")
                row.restarts += 1
                store.save(row)
        store.close()

    threads = [threading.Thread(target=bump, args=(50,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    row = Store.open(path).get("a")
    assert row is not None and row.restarts == 200


def test_a_version_1_database_is_migrated_keeping_its_rows(tmp_path):
    from llama_orchestrator.store import MIGRATIONS

    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(MIGRATIONS[0])
    conn.execute(
        "INSERT INTO instances (name, state, pid, restarts, updated_at) VALUES ('a', 'exited', 7, 3, 1)"
    )
    conn.execute("INSERT INTO events (ts, instance, kind, message) VALUES (1, 'a', 'exited', 'x')")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    store = Store.open(path)
    row = store.get("a")
    assert row is not None and (row.state, row.pid, row.restarts, row.gpu_devices) == (
        S.EXITED,
        7,
        3,
        None,
    )
    assert [e.message for e in store.events()] == ["x"]
    row.gpu_devices = [0, 3]
    store.save(row)
    assert store.get("a").gpu_devices == [0, 3]
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 8


def test_last_used_is_written_only_by_mark_used(tmp_path):
    """A row read before the daemon marked an instance used must not set its
    idle clock back when it is saved (save is an upsert of the other columns)."""
    store = Store.open(tmp_path / "s.sqlite")
    store.save(InstanceRow("a"))
    stale = store.get("a")
    store.mark_used({"a": 123.5, "unknown": 1.0})
    stale.restarts = 2
    store.save(stale)
    row = store.get("a")
    assert (row.last_used_at, row.restarts) == (123.5, 2)
