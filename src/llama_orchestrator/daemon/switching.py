"""Loading and unloading models through the router: the daemon's side of
llama-server's model management API (its router mode, which its web UI
uses: `GET /models` with each model's status, `POST /models/load` and
`/models/unload`). A load starts the model's instances (an on-demand one as
a request for it would), an unload stops them; what they do next is the
runners' business, and `/models` shows it."""

from __future__ import annotations

from typing import Any

from llama_orchestrator.daemon.ondemand import OnDemand
from llama_orchestrator.daemon.supervisor import Supervisor
from llama_orchestrator.errors import UserError
from llama_orchestrator.names import alias_names, serves
from llama_orchestrator.router.balance import model_id
from llama_orchestrator.states import RUNNING_STATES
from llama_orchestrator.states import InstanceState as S

__all__ = ["ModelSwitch", "status_value"]


def status_value(state: S | None, active: bool) -> str:
    """A model status as llama-server's router mode names it, from one of
    its instances' states."""
    if state == S.HEALTHY:
        return "loaded"
    if state == S.STOPPING:
        return "unloaded"
    if active or state in RUNNING_STATES or state == S.QUEUED:
        return "loading"
    return "unloaded"


_RANK = {"loaded": 2, "loading": 1, "unloaded": 0}


class ModelSwitch:
    def __init__(self, sup: Supervisor, on_demand: OnDemand) -> None:
        self.sup = sup
        self.on_demand = on_demand

    def _serving(self, model: str) -> list[str]:
        configs = self.sup.configs()
        return sorted(n for n, c in configs.items() if serves(model, c.alias_or(n), c.tags))

    def statuses(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, cfg in sorted(self.sup.configs().items()):
            state = self.sup.state_of(name)
            value = status_value(state, self.sup.active(name))
            alias = cfg.alias_or(name)
            entry = out.setdefault(
                model_id(alias),
                {"value": "unloaded", "aliases": list(alias_names(alias)), "instances": []},
            )
            entry["instances"].append(name)
            if _RANK[value] > _RANK[entry["value"]]:
                entry["value"] = value
            if state == S.FAILED:
                entry["failed"] = True
        return out

    def why_stopped(self, model: str) -> str | None:
        """The router's answer when nothing serves `model` and nothing will by
        itself: each of its instances is stopped or failed (None when one is
        starting, restarting, or started on demand)."""
        names = self._serving(model)
        configs = self.sup.configs()
        if not names or any(self.sup.active(n) or configs[n].on_demand for n in names):
            return None
        failed = [n for n in names if self.sup.state_of(n) == S.FAILED]
        if failed:
            return (
                f"'{model}' is not served: instance '{failed[0]}' failed (restarts "
                f"exhausted); see `llama-orch describe {failed[0]}`, then "
                f"`llama-orch up {failed[0]}`."
            )
        return (
            f"'{model}' is stopped; start it with `llama-orch up {' '.join(names)}` "
            "(or POST /models/load)."
        )

    async def load(self, model: str) -> None:
        names = self._serving(model)
        if not names:
            raise UserError(f"No instance of this machine serves '{model}'.")
        if all(self.sup.configs()[n].on_demand is not None for n in names):
            self.on_demand.wake(model)  # as a request would: room made, one loaded
            return
        await self.sup.up([n for n in names if self.sup.configs()[n].on_demand is None])

    async def unload(self, model: str) -> None:
        names = [n for n in self._serving(model) if self.sup.active(n)]
        if not names:
            raise UserError(f"'{model}' is not loaded.")
        await self.sup.down(names)
