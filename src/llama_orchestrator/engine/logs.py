"""Per-instance log files: size rotation, tail and follow (DESIGN §1).

The child writes straight into `stdout.log`/`stderr.log` (opened for append),
so it keeps logging when llama-orch is not running. Rotation therefore uses
copy-then-truncate: the child's O_APPEND writes simply continue at the new
end of the truncated file. `follow` copes with both truncation and a
rename-style rotation done by another tool (e.g. logrotate).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from llama_orchestrator.files import is_disk_full

__all__ = [
    "STREAMS",
    "log_file",
    "rotate_if_needed",
    "tail_lines",
    "server_lines",
    "LoadProgress",
    "load_progress",
    "dots_percent",
    "read_lines",
    "follow",
    "start_line",
    "is_start_line",
    "LineTimes",
    "timed_lines",
    "wall_clock",
]

STREAMS = ("stdout", "stderr")

#: llama-orch's own line in both logs, written when it starts a process and
#: after a rotation: llama-server's own times count from its start, and this
#: line says when that was (see LineTimes)
_START = re.compile(r"^--- llama-orch: (?:log rotated; )?process started at (\S+) ---$")
_START_MARK = "--- llama-orch: "
#: llama.cpp's prefix: minutes.seconds.milliseconds.microseconds since its start
_RELATIVE = re.compile(r"^(\d+)\.(\d{2})\.(\d{3})\.(\d{3}) ")


def start_line(started_at: float, rotated: bool = False) -> str:
    when = datetime.fromtimestamp(started_at, tz=timezone.utc).isoformat(timespec="microseconds")
    return f"--- llama-orch: {'log rotated; ' if rotated else ''}process started at {when} ---"


def is_start_line(line: str) -> bool:
    return line.startswith(_START_MARK) and _START.match(line) is not None


class LineTimes:
    """The wall-clock time of each line of one log, fed in order (pure).

    A start line gives the time; llama.cpp's relative prefix adds to it; a
    line without one (a backend's own print) takes the time of the line
    before. Lines before any start line (logs older than this) have none."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.last: float | None = None

    def time_of(self, line: str) -> float | None:
        if m := _START.match(line):
            with suppress(ValueError):  # a mangled line: no time from it
                self.start = self.last = datetime.fromisoformat(m[1]).timestamp()
        elif self.start is not None and (m := _RELATIVE.match(line)):
            minutes, seconds, ms, us = (int(g) for g in m.groups())
            self.last = self.start + minutes * 60 + seconds + ms / 1e3 + us / 1e6
        return self.last


def log_file(log_dir: Path, stream: str) -> Path:
    return log_dir / f"{stream}.log"


def rotate_if_needed(path: Path, max_bytes: int, backups: int, header: str | None = None) -> bool:
    """Rotate `path` to .1 (.1 to .2 ...) when it is over `max_bytes`; the
    emptied file then starts with `header` (a start line) when given."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    if backups > 0:
        for i in range(backups - 1, 0, -1):
            older = path.with_name(f"{path.name}.{i}")
            if older.exists():
                os.replace(older, path.with_name(f"{path.name}.{i + 1}"))
        first = path.with_name(f"{path.name}.1")
        try:
            shutil.copyfile(path, first)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            first.unlink(missing_ok=True)  # no room for the copy: the log stays as it is
            return False
    with open(path, "r+b") as f:
        f.truncate(0)
    if header is not None:
        with open(path, "ab") as f:  # appended, as the child's own writes are
            f.write(header.encode() + b"\n")
    return True


def tail_lines(path: Path, n: int, block: int = 8192) -> list[str]:
    """The last `n` lines of a text file, reading from the end."""
    if n <= 0:
        return []
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return []
    with f:
        f.seek(0, os.SEEK_END)
        end = f.tell()
        data = b""
        while end > 0 and data.count(b"\n") <= n:
            step = min(block, end)
            end -= step
            f.seek(end)
            data = f.read(step) + data
    lines = data.decode("utf-8", errors="replace").splitlines()
    return lines[-n:]


def timed_lines(
    lines: list[str], times: LineTimes, since: float | None = None
) -> list[tuple[float | None, str]]:
    """Each line with its time (`times` fed in order), those before `since` left out."""
    timed = [(times.time_of(line), line) for line in lines]
    if since is None:
        return timed
    return [(t, line) for t, line in timed if t is not None and t >= since]


def wall_clock(ts: float | None) -> str:
    """`--timestamps`' prefix: UTC to the millisecond, as Docker's (blank if unknown)."""
    if ts is None:
        return " " * 24
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def read_lines(
    path: Path, tail: int | None, since: float | None, times: LineTimes, timed: bool
) -> list[tuple[float | None, str]]:
    """What `logs` prints of one file: the last `tail` lines (all when None),
    those from `since` on, each with its time when `timed` or `since` ask for
    it (`times` is fed the whole file then: the start line may lie above the tail)."""
    if not timed and since is None:
        return [(None, line) for line in tail_lines(path, 10**9 if tail is None else tail)]
    lines = timed_lines(tail_lines(path, 10**9), times, since)
    return lines if tail is None else lines[len(lines) - tail :] if tail else []


#: growth of a loading process's memory or disk reads that counts as progress
#: (a real load moves megabytes a second; a hung one's figures drift by pages)
PROGRESS_BYTES = 1 << 20


@dataclass(frozen=True)
class LoadProgress:
    """How a model load goes: `logged`, the bytes in its logs; `loaded`, what
    the process holds and has read (see `process.activity`); `percent`, from
    llama.cpp's dots, where it prints them (one as each percent of the
    tensors is read; builds that log less do not)."""

    logged: int = 0
    loaded: int = 0
    percent: int | None = None

    def beyond(self, before: LoadProgress) -> bool:
        """Progress since `before` (pure): the logs changed, or the process
        loaded another PROGRESS_BYTES."""
        return self.logged != before.logged or self.loaded - before.loaded >= PROGRESS_BYTES


#: llama.cpp's load progress: a line of up to 100 dots, ended when all are read
_DOTS = re.compile(r"(?:^|\n)(\.+)(\n|$)")
_PROGRESS_TAIL = 4096


def load_progress(log_dir: Path, loaded: int = 0) -> LoadProgress:
    """How far the latest run's model load has come, from its logs and the
    process's figures (`loaded`)."""
    logged = 0
    for stream in STREAMS:
        with suppress(OSError):
            logged += os.stat(log_file(log_dir, stream)).st_size
    try:
        with open(log_file(log_dir, "stderr"), "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - _PROGRESS_TAIL))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return LoadProgress(logged, loaded)
    return LoadProgress(logged, loaded, dots_percent(text))


def dots_percent(text: str) -> int | None:
    """llama.cpp's load percentage in the tail of its stderr (pure): the last
    line of dots, 100 once it ends; None if no load progress is shown there."""
    runs = _DOTS.findall(text.split(_START_MARK)[-1])
    if not runs:
        return None
    dots, end = runs[-1]
    return 100 if end else min(99, len(dots))


def server_lines(path: Path, n: int) -> list[str]:
    """The last `n` lines the latest run of llama-server wrote (none of an
    earlier run's, and not llama-orch's start line)."""
    if n <= 0:
        return []
    lines = tail_lines(path, n + 1)
    starts = [i for i, line in enumerate(lines) if is_start_line(line)]
    return lines[starts[-1] + 1 :] if starts else lines[-n:]


class _Follower:
    """Reads lines appended to one file, surviving truncation and replacement.

    Copy-truncate rotation can truncate *and* refill a file past our position
    between two polls, so "the size shrank" alone misses it (as `tail -F`
    does). The follower therefore keeps the last bytes it read and checks they
    are still where it left them; if not, the file was rewritten: read it anew."""

    SIGNATURE = 64

    def __init__(self, path: Path, from_end: bool) -> None:
        self.path = path
        self.f: BinaryIO | None = None
        self.ino: int | None = None
        self.buf = b""
        self.sig = b""  # the last bytes read, ending at the current position
        self._open(seek_end=from_end)

    def _open(self, seek_end: bool) -> None:
        self.buf, self.sig = b"", b""
        try:
            self.f = open(self.path, "rb")
        except FileNotFoundError:
            self.f, self.ino = None, None
            return
        self.ino = os.fstat(self.f.fileno()).st_ino
        if seek_end:
            end = self.f.seek(0, os.SEEK_END)
            self.f.seek(max(0, end - self.SIGNATURE))
            self.sig = self.f.read()

    def poll(self) -> list[str]:
        try:
            st = self.path.stat()
        except FileNotFoundError:  # renamed away, no new file yet: finish the old one
            return self._drain()
        if self.f is None or st.st_ino != self.ino:  # created, or replaced by a rename
            out = self._drain()
            if self.f is not None:
                self.f.close()
            self._open(seek_end=False)
            return out + self._drain()
        if self._rewritten(st.st_size):
            self.f.seek(0)
            self.buf, self.sig = b"", b""
        return self._drain()

    def _rewritten(self, size: int) -> bool:
        assert self.f is not None
        pos = self.f.tell()
        if size < pos:
            return True
        if not self.sig:
            return False
        self.f.seek(pos - len(self.sig))
        return self.f.read(len(self.sig)) != self.sig  # leaves the position where it was

    def _drain(self) -> list[str]:
        if self.f is None:
            return []
        data = self.f.read()
        if data:
            self.sig = (self.sig + data)[-self.SIGNATURE :]
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        return [ln.decode("utf-8", errors="replace") for ln in lines]

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def follow(
    paths: dict[str, Path],
    should_stop: Callable[[], bool] = lambda: False,
    interval: float = 0.2,
) -> Iterator[tuple[str, str]]:
    """Yield (stream, line) for lines appended after the call, until should_stop().

    The files are opened now, not at the first next(), so no line written in
    between is lost."""
    followers = {name: _Follower(p, from_end=True) for name, p in paths.items()}
    return _follow(followers, should_stop, interval)


def _follow(
    followers: dict[str, _Follower], should_stop: Callable[[], bool], interval: float
) -> Iterator[tuple[str, str]]:
    try:
        while not should_stop():
            got = False
            for name, fol in followers.items():
                for line in fol.poll():
                    got = True
                    yield name, line
            if not got:
                time.sleep(interval)  # polling a file: nothing to synchronise with
    finally:
        for fol in followers.values():
            fol.close()
