"""The router's capacity: requests in flight per instance, and the bounded
per-model queues of requests waiting for a free slot (DESIGN §6).

A queue holds two classes: interactive (a client's ordinary request) and
batch (plan tasks, `X-Priority: batch`, a batch key). A freed slot goes to
the oldest interactive request, except that batch gets at least one slot in
`BATCH_SHARE` while it waits, so it never starves; among batch requests the
higher `priority` goes first, then the older (`next_waiter`, pure).

One `Slots` per daemon, shared by the router (which takes and releases a
slot around every request it forwards) and by on-demand (which reads how
busy and how recently used an instance is, and answers the queue when a
start fails). Choosing a replica is `balance`'s; this module only counts
and queues, on the event loop, with no I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from llama_orchestrator.config.settings import RouterSettings
from llama_orchestrator.router.balance import Replica, candidates, least_busy

__all__ = ["Slots", "Refusal", "next_waiter", "BATCH_SHARE", "CLASSES"]

#: batch waiting gets at least one freed slot in this many
BATCH_SHARE = 4
CLASSES = ("interactive", "batch")


class Refusal(Exception):
    """No slot for the request: 503 (none healthy, or what it waited for will
    not come) or 429 (busy)."""

    def __init__(self, status: int, message: str, kind: str, retry: bool = True) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        #: whether to invite the client to try again (Retry-After)
        self.retry = retry


@dataclass
class _Waiter:
    future: asyncio.Future[Replica]
    exclude: frozenset[str]
    batch: bool = False
    priority: int = 0
    since: float = 0.0

    @property
    def cls(self) -> str:
        return CLASSES[self.batch]


def next_waiter(waiting: list[tuple[bool, int]], streak: int) -> int | None:
    """Which waiter a freed slot goes to (pure): `waiting` is (batch,
    priority) per waiter, oldest first; `streak`, the interactive ones served
    in a row while batch waited. The oldest interactive one, unless that
    streak reached BATCH_SHARE - 1: then the first batch one of the highest
    priority (also when no interactive one waits)."""
    inter = next((i for i, (b, _) in enumerate(waiting) if not b), None)
    batch = [(-p, i) for i, (b, p) in enumerate(waiting) if b]
    if batch and (inter is None or streak >= BATCH_SHARE - 1):
        return min(batch)[1]
    return inter


@dataclass
class Slots:
    settings: RouterSettings
    #: the instances that take requests now (the daemon's board)
    replicas: Callable[[], Iterable[Replica]]
    clock: Callable[[], float] = time.time
    in_flight: dict[str, int] = field(default_factory=dict)
    #: when each instance last began or ended a request (`clock`)
    last_used: dict[str, float] = field(default_factory=dict)
    _queues: dict[str, deque[_Waiter]] = field(default_factory=dict)
    #: hook(class, seconds) when a queued request gets its slot (the metrics)
    on_wait: Callable[[str, float], None] | None = None
    #: who waits for the requests in flight on an instance to end (`settle`)
    _settling: dict[str, asyncio.Event] = field(default_factory=dict)
    #: per model: interactive requests served in a row while batch waited
    _streak: dict[str, int] = field(default_factory=dict)

    def queue_depth(self, cls: str | None = None) -> int:
        """Requests waiting (of one class: "interactive" or "batch")."""
        return sum(
            1
            for q in self._queues.values()
            for w in q
            if not w.future.done() and (cls is None or w.cls == cls)
        )

    def waiting(self, model: str, cls: str) -> int:
        """Requests of class `cls` waiting for `model`."""
        return sum(1 for w in self._queues.get(model, ()) if not w.future.done() and w.cls == cls)

    def busy(self, name: str) -> bool:
        return self.in_flight.get(name, 0) > 0

    def take(self, r: Replica) -> Replica:
        self.in_flight[r.name] = self.in_flight.get(r.name, 0) + 1
        self.last_used[r.name] = self.clock()
        return r

    def release(self, r: Replica) -> int:
        """One request on `r` ended; how many are still in flight there."""
        left = self.in_flight[r.name] = max(0, self.in_flight.get(r.name, 0) - 1)
        self.last_used[r.name] = self.clock()
        self.wake()
        if not left:
            settled = self._settling.pop(r.name, None)
            if settled is not None:
                settled.set()
        return left

    def waiting_models(self) -> list[str]:
        """Models some request is queued for."""
        return [m for m, q in self._queues.items() if any(not w.future.done() for w in q)]

    def refuse_waiting(self, models: set[str], message: str) -> None:
        """Answer every request queued for `models` with 503 and `message`
        (what they wait for will not come: an on-demand start failed)."""
        for model in models:
            for waiter in self._queues.pop(model, deque()):
                if not waiter.future.done():
                    waiter.future.set_exception(Refusal(503, message, "unavailable_error"))

    def wake(self) -> None:
        """Give freed (or newly healthy) slots to the oldest waiters, per model."""
        if not any(self._queues.values()):
            return  # the common case: nobody waits
        replicas = list(self.replicas())
        for model, queue in self._queues.items():
            while queue:
                for gone in [w for w in queue if w.future.done()]:
                    queue.remove(gone)
                streak = self._streak.get(model, 0)
                i = next_waiter([(w.batch, w.priority) for w in queue], streak)
                if i is None:
                    break
                chosen = queue[i]
                r = least_busy(candidates(model, replicas), self.in_flight, chosen.exclude)
                if r is None:
                    break
                del queue[i]
                if chosen.batch:
                    self._streak[model] = 0
                elif any(w.batch for w in queue):
                    self._streak[model] = streak + 1
                chosen.future.set_result(self.take(r))
                if self.on_wait is not None:
                    self.on_wait(chosen.cls, self.clock() - chosen.since)

    async def acquire(
        self,
        model: str,
        exclude: frozenset[str],
        loading: float | None = None,
        batch: bool = False,
        priority: int = 0,
    ) -> Replica:
        """A slot on the least busy replica serving `model`, waiting in the
        model's queue when all are busy (`batch`: behind interactive requests,
        by `priority`). `loading`: nothing serves it yet, but an on-demand
        start is under way; wait this long for it. Raises Refusal (503 none
        healthy, 429 queue full or waited too long)."""
        serving = candidates(model, self.replicas())
        cands = [c for c in serving if c.name not in exclude]
        timeout = self.settings.queue_timeout
        if not cands:
            if serving or loading is None:
                raise Refusal(
                    503,
                    f"No healthy instance serves '{model}' right now; try again shortly.",
                    "unavailable_error",
                )
            timeout = loading
        else:
            loading = None
        queue = self._queues.setdefault(model, deque())
        if not queue and cands:
            r = least_busy(cands, self.in_flight, exclude)
            if r is not None:
                return self.take(r)
        if len(queue) >= self.settings.max_queue:
            raise Refusal(
                429, f"Every slot for '{model}' is busy and the queue is full.", "rate_limit_error"
            )
        waiter = _Waiter(
            asyncio.get_running_loop().create_future(), exclude, batch, priority, self.clock()
        )
        queue.append(waiter)
        try:
            await asyncio.wait({waiter.future}, timeout=timeout)
        except asyncio.CancelledError:  # the client left while waiting
            if (
                waiter.future.done()
                and not waiter.future.cancelled()
                and waiter.future.exception() is None
            ):
                self.release(waiter.future.result())  # granted at that very moment
            else:
                self._forget(queue, waiter)
            raise
        if not waiter.future.done():
            self._forget(queue, waiter)
            if loading is not None:
                raise Refusal(
                    503,
                    f"'{model}' did not finish loading within {loading:g}s.",
                    "unavailable_error",
                )
            raise Refusal(
                429, f"Every slot for '{model}' stayed busy for {timeout:g}s.", "rate_limit_error"
            )
        return waiter.future.result()  # or the refusal an on-demand start failed with

    @staticmethod
    def _forget(queue: deque[_Waiter], waiter: _Waiter) -> None:
        waiter.future.cancel()
        if waiter in queue:
            queue.remove(waiter)

    async def settle(self, name: str, timeout: float) -> None:
        """Wait (at most `timeout`) until no request is in flight on `name`.
        The caller has taken it off the board first, so no new one arrives."""
        if self.in_flight.get(name, 0) > 0:
            settled = self._settling.setdefault(name, asyncio.Event())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(settled.wait(), timeout)
