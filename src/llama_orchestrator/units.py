"""Sizes and counts for people (a leaf: tables and messages need them
without the config models)."""

from __future__ import annotations

__all__ = ["MIB", "human_bytes", "human_count"]

MIB = 1024 * 1024


def human_bytes(n_bytes: float) -> str:
    """Bytes for people: `145 KiB`, `253 MiB`, `5.1 GB`."""
    if n_bytes < MIB:
        return f"{n_bytes / 1024:.0f} KiB"
    if n_bytes < 1024 * MIB:
        return f"{n_bytes / MIB:.0f} MiB"
    return f"{n_bytes / (1024 * MIB):.1f} GB"


def human_count(n: int) -> str:
    """Parameter counts as model cards say them: `7.24B`, `268M`, `35K`."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}B" if unit == "B" else f"{n / scale:.0f}{unit}"
    return str(n)
