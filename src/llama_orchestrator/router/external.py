"""The router's side of external upstreams: for each one its config, its
key (read at each request), its requests-per-minute window, and what it
spent in the last 24 hours; what each answer cost goes to `on_usage`.

Which requests an upstream may take now is `blocked` (429 + Retry-After when
none of a model's replicas may); the decisions are `upstreams`' (pure). An
upstream that refuses the key on a request is `refused`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llama_orchestrator.config.upstream import UpstreamConfig
from llama_orchestrator.errors import OrchError
from llama_orchestrator.store.rows import UsageRecord
from llama_orchestrator.upstreams import RateWindow, Spending, Usage, api_key, cost

__all__ = ["External", "Externals"]


@dataclass
class External:
    name: str
    cfg: UpstreamConfig
    config_dir: Path
    rate: RateWindow

    @property
    def budget(self) -> float | None:
        b = self.cfg.upstream.budget
        return b.per_day if b is not None else None


@dataclass
class Externals:
    clock: Callable[[], float] = time.time
    #: each request's tokens and cost (the daemon records them)
    on_usage: Callable[[UsageRecord], None] | None = None
    #: (upstream, kind, message): its daily budget ran out (an event)
    on_event: Callable[[str, str, str], None] | None = None
    #: (upstream, why): it refused the key on a request (the daemon takes it
    #: out of service for a while, growing with each refusal in a row)
    on_refused: Callable[[str, str], None] | None = None
    by_name: dict[str, External] = field(default_factory=dict)
    spending: Spending = field(default_factory=Spending)
    #: refusals of the key in a row, by upstream (an answer it accepts ends them)
    refusals: dict[str, int] = field(default_factory=dict)

    def set(self, name: str, cfg: UpstreamConfig, config_dir: Path) -> None:
        """Its config as now (its request window kept while its limit is the same)."""
        old = self.by_name.get(name)
        limit = cfg.upstream.requests_per_minute
        rate = old.rate if old is not None and old.rate.limit == limit else RateWindow(limit)
        self.by_name[name] = External(name, cfg, config_dir, rate)

    def drop(self, name: str) -> None:
        self.by_name.pop(name, None)

    def key(self, name: str) -> str | None:
        """Its key now (raises upstreams.KeyMissing)."""
        e = self.by_name[name]
        return api_key(name, e.cfg, e.config_dir)

    def keys(self) -> list[str]:
        """Every upstream's key that can be read now (to redact them)."""
        out = []
        for name in self.by_name:
            try:
                key = self.key(name)
            except OrchError:
                continue
            if key:
                out.append(key)
        return out

    def blocked(self, name: str) -> tuple[float, str] | None:
        """(seconds until it may take a request, why), or None: it may now."""
        e = self.by_name.get(name)
        if e is None:
            return None
        now = self.clock()
        if wait := e.rate.wait(now):
            limit = e.rate.limit or 0
            return wait, f"upstream '{name}' is at its limit of {limit:g} requests a minute"
        if wait := self.spending.over(name, e.budget, now):
            return wait, (
                f"upstream '{name}' has spent its budget of {e.budget:g} for the last 24 hours"
            )
        return None

    def refused(self, name: str, status: int, detail: str) -> str:
        """It answered a request with 401/403: the key llama-orch sends is not
        taken (revoked, or its `/models`, which the checks ask, needs none).
        Counted, told to `on_refused`; what the client is told is returned."""
        self.refusals[name] = self.refusals.get(name, 0) + 1
        why = f"HTTP {status}: {detail}" if detail else f"HTTP {status}"
        if self.on_refused is not None:
            self.on_refused(name, f"it refused the key on a request ({why})")
        return (
            f"The upstream '{name}' refused the key llama-orch sends it ({why}); it is out of "
            "service until that is fixed (the api_key_env or api_key_file of its config)."
        )

    def accepted(self, name: str) -> None:
        """It answered a request: the key works (again)."""
        self.refusals.pop(name, None)

    def take(self, name: str) -> None:
        """One request goes to it now (counted against its rate)."""
        e = self.by_name.get(name)
        if e is not None:
            e.rate.take(self.clock())

    def record(
        self, name: str, usage: Usage, run_id: str | None = None, task_id: str | None = None
    ) -> float:
        """What one answer cost (from its `usage`); recorded, and counted against the budget."""
        e = self.by_name.get(name)
        if e is None:
            return 0.0
        now = self.clock()
        spent = cost(e.cfg, usage)
        before = self.spending.spent(name, now)
        self.spending.add(name, now, spent)
        if self.on_usage is not None:
            model = e.cfg.remote_model(name)
            self.on_usage(
                UsageRecord(
                    now, name, model, run_id, task_id, usage.tokens_in, usage.tokens_out, spent
                )
            )
        budget = e.budget
        if budget is not None and before < budget <= before + spent and self.on_event:
            self.on_event(
                name,
                "budget_exceeded",
                f"upstream '{name}' spent {before + spent:.4f} of its {budget:g} for 24 hours; "
                "its requests get 429 until older spending leaves the window",
            )
        return spent
