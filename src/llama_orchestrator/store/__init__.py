"""SQLite state: the one owner of `state/state.sqlite` (DESIGN §5, STYLE 10):
the schema and its migrations (`schema`), the typed rows (`rows`), what a
full disk refused (`unsaved`), and the database (`database`).

WAL mode, synchronous=FULL and BEGIN IMMEDIATE for read-then-write, so two
CLI processes (or the CLI and the daemon) serialise on the write lock and a
process killed at any moment loses nothing it committed. The schema version
lives in `PRAGMA user_version`; MIGRATIONS[i] upgrades version i to i+1.

A full disk does not stop the daemon's supervision: its stores share one
`Unsaved`, which keeps the instance rows and events the disk refused; every
read of the daemon sees them, and they are written with the next write that
succeeds (or by `flush`, which the daemon calls every few seconds). A CLI
command without the daemon gets the full-disk error instead.
"""
