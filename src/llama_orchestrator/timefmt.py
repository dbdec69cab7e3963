"""Durations for people: parse `--since 10m`, print `2h03m` (pure)."""

from __future__ import annotations

import re
from datetime import datetime

from llama_orchestrator.errors import UserError

__all__ = ["parse_since", "human_duration"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)([smhdw]))+$")


def parse_since(text: str, now: float) -> float:
    """`10m`, `1h30m`, `2d` ago, or an ISO 8601 time -> a POSIX timestamp."""
    t = text.strip().lower()
    if _DURATION.match(t):
        seconds = sum(float(n) * _UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smhdw])", t))
        return now - seconds
    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UserError(
            f"--since {text!r} is neither a duration nor a time.",
            hint="Use e.g. 30s, 10m, 2h, 1d, or 2026-11-22T06:00:00.",
        ) from None
    return dt.timestamp()


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"
