import sqlite3
import threading

import pytest

from llama_orchestrator.errors import DiskFull, StateError
from llama_orchestrator.states import Desired
from llama_orchestrator.states import InstanceState as S
from llama_orchestrator.store.database import Store
from llama_orchestrator.store.rows import InstanceRow
from llama_orchestrator.store.schema import SCHEMA_VERSION
from llama_orchestrator.store.unsaved import Unsaved
from tests.helpers import fill, make_room


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
    from llama_orchestrator.store.schema import MIGRATIONS

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
    assert (
        sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 10
    )


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


# --- a full disk (issue 24) ---------------------------------------------------------


def test_a_full_disk_is_a_clear_error_and_leaves_the_row_as_it_was(tmp_path):
    store = Store.open(tmp_path / "state" / "state.sqlite")
    row = store.get_or_new("a")
    store.set_state(row, S.STARTING, "started", pid=5)
    fill(store)
    with pytest.raises(DiskFull) as err:
        store.set_state(store.get("a"), S.HEALTHY, "ok", {"probe": "x" * 5000})
    msg = str(err.value)
    assert "state.sqlite cannot be written" in msg and "is full (" in msg and "free)" in msg
    assert str(tmp_path / "state") in msg and "Free some space" in err.value.hint
    assert store.get("a").state == S.STARTING  # nothing half-written


def test_the_daemons_stores_keep_what_a_full_disk_refused_and_write_it_in_order(tmp_path):
    path = tmp_path / "state" / "state.sqlite"
    clock = Clock()
    unsaved = Unsaved()
    loop, worker = Store.open(path, clock, unsaved), Store.open(path, clock, unsaved)
    loop.set_state(loop.get_or_new("a"), S.STARTING, "started", pid=5)
    loop.set_state(loop.get("a"), S.HEALTHY, "ok")
    fill(loop, worker)
    clock.t = 1001
    row = loop.get("a")
    loop.set_state(row, S.EXITED, "killed", {"signal": 9}, pid=None)  # no error raised
    loop.set_state(loop.get("a"), S.BACKOFF, "restart in 1s", next_restart_at=1002)
    assert unsaved and unsaved.error is not None and unsaved.since == 1000  # fill() met it
    # every connection of the daemon sees the truth; the disk does not have it yet
    assert worker.get("a").state == S.BACKOFF and [r.state for r in worker.all()] == [S.BACKOFF]
    assert Store.open(path).get("a").state == S.HEALTHY
    worker.set_state(worker.get("a"), S.STARTING, "started again", pid=6)  # queued behind
    assert worker.get("a").pid == 6 and Store.open(path).get("a").state == S.HEALTHY
    make_room(loop, worker)
    loop.add_event(None, "later", "after the disk had room")
    assert not unsaved and unsaved.since is None
    disk = Store.open(path)
    assert disk.get("a").state == S.STARTING and disk.get("a").pid == 6
    kinds = [e.kind for e in disk.events() if e.kind != "filler"]
    assert kinds == ["starting", "healthy", "exited", "backoff", "starting", "later"]


def test_a_full_disk_does_not_drop_other_tables_writes_in_silence(tmp_path):
    unsaved = Unsaved()
    store = Store.open(tmp_path / "s.sqlite", Clock(), unsaved)
    fill(store)
    with pytest.raises(DiskFull), store.transaction():
        for i in range(50):
            store.execute(
                "INSERT INTO plan_runs (id, name, state, created_at, source, plan) "
                "VALUES (?, 'p', 'running', 0, '', ?)",
                (f"r{i}", "x" * 2000),
            )
    assert store.execute("SELECT count(*) FROM plan_runs").fetchone()[0] == 0
