"""/v1/models: every model the router serves, each with what one of its
instances' own /v1/models says of it (`meta`: parameters, context, size;
`aliases`, `tags`, `created`), asked once while that instance stays
healthy, and where it runs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from llama_orchestrator.names import alias_names
from llama_orchestrator.router.balance import Replica, hosts_of
from llama_orchestrator.wire.pool import PoolError

__all__ = ["ModelList", "MODEL_INFO_TIMEOUT"]

#: how long /v1/models waits for an instance's own /v1/models (its `meta`)
MODEL_INFO_TIMEOUT = 2.0

#: get(replica, path) -> the body of its answer; raises PoolError
Get = Callable[[Replica, str], Awaitable[bytes]]


class ModelList:
    def __init__(self, get: Get, started: float) -> None:
        self._get = get
        #: when the router started: the `created` of a model no instance has told us about
        self.started = started
        #: (instance, port) -> its /v1/models entry (with llama-server's `meta`)
        self._info: dict[tuple[str, int], dict[str, Any]] = {}

    async def entries(self, aliases: list[str], replicas: list[Replica]) -> list[dict[str, Any]]:
        """One entry per alias, in the order given."""
        live = {(r.name, r.port) for r in replicas}
        for key in [k for k in self._info if k not in live]:
            del self._info[key]  # gone, or restarted elsewhere: ask anew
        todo = [
            r
            for r in replicas
            if (r.name, r.port) not in self._info and not r.remote and r.peer is None
        ]
        for r, info in zip(todo, await asyncio.gather(*(self._ask(r) for r in todo)), strict=True):
            if info is not None:
                self._info[(r.name, r.port)] = info
        entries = []
        for model in aliases:
            mine = [r for r in replicas if model in alias_names(r.alias)]
            info = next(
                (self._info[(r.name, r.port)] for r in mine if (r.name, r.port) in self._info), {}
            )
            created = info.get("created")
            entry: dict[str, Any] = {
                **info,  # what llama-server says of itself: meta, aliases, tags ...
                "id": model,
                "object": "model",
                "created": created
                if isinstance(created, int) and created > 0
                else int(self.started),
                "owned_by": "llama-orch",
                "hosts": hosts_of(model, replicas),  # "local" and the peers it runs on
            }
            names = sorted({n for r in mine for n in alias_names(r.alias)})
            if len(names) > 1 and "aliases" not in info:
                entry["aliases"] = names
            entries.append(entry)
        return entries

    async def _ask(self, r: Replica) -> dict[str, Any] | None:
        """The first entry of `r`'s own /v1/models; None if it does not say in time."""
        try:
            raw = await asyncio.wait_for(self._get(r, "/v1/models"), MODEL_INFO_TIMEOUT)
            data = json.loads(raw)["data"][0]
        except (PoolError, asyncio.TimeoutError, ValueError, KeyError, IndexError, TypeError):
            return None
        return data if isinstance(data, dict) else None
