"""GGUF file checks. Reading full metadata belongs to the GPU/model issue;
the core only needs to know a file is GGUF before it starts a server on it."""

from __future__ import annotations

from pathlib import Path

__all__ = ["GGUF_MAGIC", "is_gguf"]

GGUF_MAGIC = b"GGUF"


def is_gguf(path: Path) -> bool:
    """True when the file starts with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False
