"""Prometheus metrics of the daemon (served on the control API's /metrics).

Instance state and restart counts are read from the store at scrape time (one
source of truth, nothing to keep in step); health-check results and latencies
are counted as they happen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from llama_orchestrator.engine.health import ProbeResult
from llama_orchestrator.router.proxy import Router, RouterMetrics
from llama_orchestrator.router.slots import CLASSES
from llama_orchestrator.states import InstanceState
from llama_orchestrator.store.database import Store
from llama_orchestrator.store.rows import UsageRecord

__all__ = ["Metrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ON_DEMAND_EVENTS = frozenset({"on_demand_start", "on_demand_wait", "swapped_out", "idle_stop"})


class _StoreCollector(Collector):
    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        rows = self.store.all()
        up = GaugeMetricFamily(
            "llama_orch_instance_up", "1 when the instance is healthy.", labels=["instance"]
        )
        state = GaugeMetricFamily(
            "llama_orch_instance_state",
            "1 for the state the instance is in, 0 for the others.",
            labels=["instance", "state"],
        )
        restarts = CounterMetricFamily(
            "llama_orch_restarts", "Restarts done by the daemon.", labels=["instance"]
        )
        for row in rows:
            up.add_metric([row.name], 1.0 if row.state == InstanceState.HEALTHY else 0.0)
            for s in InstanceState:
                state.add_metric([row.name, s.value], 1.0 if row.state == s else 0.0)
            restarts.add_metric([row.name], float(row.restarts))
        yield from (up, state, restarts)


class _RouterCollector(Collector):
    def __init__(self, router: Router) -> None:
        self.router = router

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "llama_orch_router_queue_depth",
            "Requests waiting for a free slot, by class (interactive, batch).",
            labels=["class"],
        )
        for cls in CLASSES:
            depth.add_metric([cls], float(self.router.queue_depth(cls)))
        busy = GaugeMetricFamily(
            "llama_orch_router_in_flight", "Requests in flight per instance.", labels=["instance"]
        )
        for name, n in sorted(self.router.in_flight.items()):
            busy.add_metric([name], float(n))
        yield from (depth, busy)


class Metrics:
    def __init__(self, store: Store) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StoreCollector(store))
        self.checks = Counter(
            "llama_orch_health_checks",
            "Health checks by result (healthy, loading, down, error).",
            ["instance", "result"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "llama_orch_health_check_latency_seconds",
            "Time a health check took.",
            ["instance"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.queue_wait_seconds = Histogram(
            "llama_orch_router_queue_wait_seconds",
            "Time a request waited in the router's queue for a slot, by class.",
            ["class"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self._tokens = Counter(
            "llama_orch_upstream_tokens",
            "Tokens sent to (in) and received from (out) external upstreams.",
            ["upstream", "direction"],
            registry=self.registry,
        )
        self._cost = Counter(
            "llama_orch_upstream_cost",
            "What external upstreams' answers cost, in their price's currency.",
            ["upstream"],
            registry=self.registry,
        )
        self.on_demand = Counter(
            "llama_orch_on_demand_events",
            "On-demand instances: on_demand_start, on_demand_wait, swapped_out, idle_stop.",
            ["instance", "kind"],
            registry=self.registry,
        )

    def upstream_usage(self, record: UsageRecord) -> None:
        """One answer of an external upstream: its tokens and what they cost."""
        self._tokens.labels(record.upstream, "in").inc(record.tokens_in)
        self._tokens.labels(record.upstream, "out").inc(record.tokens_out)
        self._cost.labels(record.upstream).inc(record.cost)

    def watch_router(self, router: Router) -> None:
        """The router's queue depth and requests in flight per instance (read at scrape)."""
        self.registry.register(_RouterCollector(router))

    def router_hooks(self) -> RouterMetrics:
        """Request, latency, time-to-first-token and retry metrics, for the router to call."""
        requests = Counter(
            "llama_orch_router_requests",
            "Requests by model, instance and HTTP status.",
            ["model", "instance", "status"],
            registry=self.registry,
        )
        latency = Histogram(
            "llama_orch_router_request_seconds",
            "Time from request to the last byte of the answer.",
            ["model"],
            registry=self.registry,
        )
        ttft = Histogram(
            "llama_orch_router_first_byte_seconds",
            "Time from request to the first byte of the answer (time to first token when streaming).",
            ["model"],
            registry=self.registry,
        )
        retries = Counter(
            "llama_orch_router_retries",
            "Requests sent to another replica after one failed before answering.",
            ["model"],
            registry=self.registry,
        )
        counted, timed, first = _kept(requests), _kept(latency), _kept(ttft)

        def request(model: str, instance: str, status: int, secs: float) -> None:
            counted(model, instance, str(status)).inc()
            if instance:
                timed(model).observe(secs)

        return RouterMetrics(
            request=request,
            first_byte=lambda model, secs: first(model).observe(secs),
            retry=lambda model: retries.labels(model).inc(),
        )

    def event(self, instance: str | None, kind: str) -> None:
        """Count the on-demand events (starts, waits, swaps, idle stops)."""
        if kind in ON_DEMAND_EVENTS and instance is not None:
            self.on_demand.labels(instance, kind).inc()

    def queue_wait(self, cls: str, seconds: float) -> None:
        """A queued request got its slot after `seconds` (`cls`: interactive or batch)."""
        self.queue_wait_seconds.labels(cls).observe(seconds)

    def health(self, name: str, result: ProbeResult) -> None:
        self.checks.labels(name, result.status).inc()
        self.latency.labels(name).observe(result.latency_ms / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _kept(metric: Any) -> Callable[..., Any]:
    """`metric.labels(*values)`, each child made once and kept: labels() takes
    a lock and validates its values on every call, and the router calls it
    per request (the label values a config can produce are few)."""
    children: dict[tuple[str, ...], Any] = {}

    def child(*values: str) -> Any:
        found = children.get(values)
        if found is None:
            found = children[values] = metric.labels(*values)
        return found

    return child
