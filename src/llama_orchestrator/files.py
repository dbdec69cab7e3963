"""Writing a file so that a crash never leaves half of it (a leaf module:
the daemon's info file, configs and service units use it)."""

from __future__ import annotations

import os
from pathlib import Path

from llama_orchestrator.errors import DiskFull

__all__ = ["atomic_write_text", "private_dir", "disk_full", "is_disk_full"]


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same folder, fsync, then rename over `path`,
    so a crash leaves either the old file or the new one, never half of one."""
    import tempfile  # lazily: most commands never write a config

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if os.name == "posix":  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def private_dir(path: Path) -> Path:
    """`path` made (with its parents) and readable by its owner alone: the
    home's state, logs and plans hold prompts, outputs and events, which
    other local users must not read. A folder already there is narrowed too.
    (On Windows the mode is not used; a user's home folder is private there.)"""
    path.mkdir(parents=True, exist_ok=True)
    if os.name == "posix" and path.stat().st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def is_disk_full(exc: BaseException) -> bool:
    import errno

    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full(path: Path, what: str) -> DiskFull:
    """The one sentence for a full disk: what could not be written, where,
    and how much room is left there; the fix is to make room."""
    import shutil

    from llama_orchestrator.units import human_bytes

    folder = path if path.is_dir() else path.parent
    try:
        left = f" ({human_bytes(shutil.disk_usage(folder).free)} free)"
    except OSError:
        left = ""
    return DiskFull(
        f"{what} cannot be written: the disk of {folder} is full{left}.",
        hint=f"Free some space on the disk of {folder}; llama-orch goes on once it can write.",
    )
