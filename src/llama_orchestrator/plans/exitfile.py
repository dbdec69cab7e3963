"""A shell task's end, written where the next daemon finds it.

A plan's shell (and script) task runs in its own process group, so it
outlives a daemon that dies. Only a process's parent learns its exit code:
one that finished while no daemon ran would be taken for unfinished, and run
again. So each attempt runs under this small program, which starts the
task's command with the same output files, waits for it, and writes how it
ended (atomically) to the attempt's exit file; the next daemon reads it and
records the task as finished instead of running it twice.

    python -m llama_orchestrator.plans.exitfile EXIT_FILE -- ARGV...

Only the standard library: it starts once per attempt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Ended", "wrap", "read", "main"]


@dataclass(frozen=True)
class Ended:
    """How an attempt's command ended: its exit code (negative: the signal
    that killed it), or why it could not start."""

    code: int
    error: str | None = None


def wrap(argv: list[str], exit_file: Path) -> list[str]:
    """`argv`, run under this program (with this Python)."""
    return [sys.executable, "-m", __name__, str(exit_file), "--", *argv]


def read(exit_file: Path) -> Ended | None:
    """What the exit file says; None when there is none (the attempt did not
    end, or ended with this program killed too)."""
    try:
        data = json.loads(exit_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("code"), int):
        return None
    error = data.get("error")
    return Ended(data["code"], error if isinstance(error, str) else None)


def _write(exit_file: Path, ended: Ended) -> None:
    tmp = exit_file.with_name(f".{exit_file.name}.tmp")
    tmp.write_text(json.dumps({"code": ended.code, "error": ended.error}), encoding="utf-8")
    os.replace(tmp, exit_file)


def main(args: list[str]) -> int:
    exit_file, sep, *argv = args
    assert sep == "--" and argv, "usage: exitfile EXIT_FILE -- ARGV..."
    try:
        child = subprocess.Popen(argv)  # stdio, environment and folder: ours
    except OSError as exc:
        ended = Ended(127, f"cannot run {argv[0]!r}: {exc.strerror or exc}")
    else:
        ended = Ended(child.wait())
    _write(Path(exit_file), ended)
    if ended.error:
        sys.stderr.write(ended.error + "\n")
    return ended.code if ended.code >= 0 else 128 - ended.code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
