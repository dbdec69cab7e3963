"""The base of every config section: unknown fields refused, schemas built
on first use (pydantic's build at import cost ~90 ms of every command)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["Section"]


class Section(BaseModel):
    # defer_build: schemas are built on first use, not at import (~90 ms off every command)
    model_config = ConfigDict(extra="forbid", defer_build=True)
