"""What every command gets: the home and a lazily built engine."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any

import typer
from rich.console import Console

from llama_orchestrator.engine.lifecycle import Engine
from llama_orchestrator.home import Home

__all__ = ["AppContext", "app_context", "out", "err", "print_json"]

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


@dataclass
class AppContext:
    home: Home
    debug: bool = False
    _engine: Engine | None = field(default=None, repr=False)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(self.home)
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()


def app_context(ctx: typer.Context) -> AppContext:
    obj = ctx.find_root().obj
    assert isinstance(obj, AppContext)
    return obj


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
