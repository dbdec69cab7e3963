"""The state database's schema: MIGRATIONS[i] upgrades version i to i+1;
the version lives in `PRAGMA user_version`. Append, never edit."""

from __future__ import annotations

__all__ = ["MIGRATIONS", "SCHEMA_VERSION"]

MIGRATIONS: list[str] = [
    # 0 -> 1: the first release
    """
    CREATE TABLE instances (
        name            TEXT PRIMARY KEY,
        desired         TEXT NOT NULL DEFAULT 'stopped',
        state           TEXT NOT NULL DEFAULT 'created',
        pid             INTEGER,
        create_time     REAL,
        host            TEXT,
        port            INTEGER,
        started_at      REAL,
        exited_at       REAL,
        exit_code       INTEGER,
        restarts        INTEGER NOT NULL DEFAULT 0,
        last_exit       TEXT,
        supervised      INTEGER NOT NULL DEFAULT 0,
        next_restart_at REAL,
        updated_at      REAL NOT NULL
    );
    CREATE TABLE events (
        id       INTEGER PRIMARY KEY AUTOINCREMENT,
        ts       REAL NOT NULL,
        instance TEXT,
        kind     TEXT NOT NULL,
        message  TEXT NOT NULL,
        data     TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX events_by_instance ON events (instance, id);
    CREATE INDEX events_by_ts ON events (ts);
    """,
    # 1 -> 2: the GPUs a run actually got (`device_id: auto` is chosen at each start)
    """
    ALTER TABLE instances ADD COLUMN gpu_devices TEXT;
    """,
    # 2 -> 3: restarts in a row (the backoff exponent), so a daemon that is
    # killed and started again resumes the count where it was
    """
    ALTER TABLE instances ADD COLUMN streak INTEGER NOT NULL DEFAULT 0;
    """,
    # 3 -> 4: plan runs (DESIGN §7) and their tasks, so a run survives the daemon
    """
    CREATE TABLE plan_runs (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        state       TEXT NOT NULL,
        created_at  REAL NOT NULL,
        finished_at REAL,
        source      TEXT NOT NULL,
        plan        TEXT NOT NULL
    );
    CREATE TABLE plan_tasks (
        run_id            TEXT NOT NULL,
        task_id           TEXT NOT NULL,
        idx               INTEGER NOT NULL,
        state             TEXT NOT NULL,
        attempts          INTEGER NOT NULL DEFAULT 0,
        not_before        REAL NOT NULL DEFAULT 0,
        started_at        REAL,
        finished_at       REAL,
        instance          TEXT,
        error             TEXT,
        prompt_tokens     INTEGER,
        completion_tokens INTEGER,
        pid               INTEGER,
        create_time       REAL,
        PRIMARY KEY (run_id, task_id)
    );
    """,
    # 4 -> 5: when an on-demand instance last served a request (its idle clock)
    """
    ALTER TABLE instances ADD COLUMN last_used_at REAL;
    """,
    # 5 -> 6: the cards discovery has reported, so a pinned card that is gone
    # is told apart from one that never was there
    """
    CREATE TABLE gpus_seen (
        backend TEXT NOT NULL,
        idx     INTEGER NOT NULL,
        name    TEXT,
        seen_at REAL NOT NULL,
        PRIMARY KEY (backend, idx)
    );
    """,
    # 6 -> 7: the config a running process was started with (its digest), so
    # ps can say a config was changed since: it takes effect at the next restart
    """
    ALTER TABLE instances ADD COLUMN config_digest TEXT;
    """,
    # 7 -> 8: the state `queued` (waiting for its turn to load), which an
    # older llama-orch cannot read; and the GPU leases of plans' script tasks,
    # so a daemon killed mid-lease gives the card back and restores what yielded
    """
    CREATE TABLE gpu_leases (
        gpu      INTEGER PRIMARY KEY,
        run_id   TEXT NOT NULL,
        task_id  TEXT NOT NULL,
        since    REAL NOT NULL,
        state    TEXT NOT NULL,
        yielded  TEXT NOT NULL DEFAULT '[]'
    );
    """,
    # 8 -> 9: what each request to an external upstream cost (`llama-orch
    # usage`, the daily budget), and which tier answered a plan's task
    """
    CREATE TABLE usage (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        ts         REAL NOT NULL,
        upstream   TEXT NOT NULL,
        model      TEXT NOT NULL,
        run_id     TEXT,
        task_id    TEXT,
        tokens_in  INTEGER NOT NULL,
        tokens_out INTEGER NOT NULL,
        cost       REAL NOT NULL
    );
    CREATE INDEX usage_by_ts ON usage (ts);
    ALTER TABLE plan_tasks ADD COLUMN tier TEXT;
    ALTER TABLE plan_tasks ADD COLUMN cost REAL;
    """,
    # 9 -> 10: the cluster node an instance's process runs on (a cluster home;
    # NULL: this machine), whose pid is not this machine's to look at
    """
    ALTER TABLE instances ADD COLUMN node TEXT;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)
