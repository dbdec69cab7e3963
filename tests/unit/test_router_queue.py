"""The router's slots and queues with an on-demand loader (no sockets)."""

from __future__ import annotations

import asyncio

import pytest

from llama_orchestrator.config.settings import RouterSettings
from llama_orchestrator.router.balance import Replica
from llama_orchestrator.router.proxy import Router, _Refusal

LAZY = Replica("lazy-1", "lazy", (), "127.0.0.1", 9, slots=1)


class FakeLoader:
    def __init__(self, load_timeout: float | None) -> None:
        self.load_timeout = load_timeout
        self.woken: list[str] = []
        self.idled: list[str] = []

    def wake(self, model: str) -> float | None:
        self.woken.append(model)
        return self.load_timeout

    def models(self) -> set[str]:
        return {"lazy"}

    def idle(self, name: str) -> None:
        self.idled.append(name)


def router(loader: FakeLoader | None, healthy: dict[str, Replica]) -> Router:
    r = Router(RouterSettings(), lambda: healthy, lambda: {"lazy"})
    r.loader = loader
    return r


async def test_a_request_waits_for_an_on_demand_instance_to_load():
    healthy: dict[str, Replica] = {}
    loader = FakeLoader(5.0)
    rt = router(loader, healthy)
    assert rt.models() == ["lazy"]  # listed before it runs
    waiting = asyncio.ensure_future(rt.acquire("lazy", frozenset()))
    await asyncio.sleep(0.01)
    assert loader.woken == ["lazy"] and not waiting.done()
    assert rt.waiting_models() == ["lazy"]
    healthy[LAZY.name] = LAZY  # it became healthy: the supervisor wakes the queues
    rt.wake()
    assert await waiting == LAZY
    assert rt.in_flight == {"lazy-1": 1} and "lazy-1" in rt.last_used
    rt.release(LAZY)
    assert loader.idled == ["lazy-1"]  # its last request ended


async def test_no_loader_or_nothing_on_demand_is_503_at_once():
    for loader in (None, FakeLoader(None)):
        with pytest.raises(_Refusal) as exc:
            await router(loader, {}).acquire("lazy", frozenset())
        assert exc.value.status == 503


async def test_a_start_that_failed_answers_the_queue_and_a_slow_load_times_out():
    rt = router(FakeLoader(5.0), {})
    waiting = asyncio.ensure_future(rt.acquire("lazy", frozenset()))
    await asyncio.sleep(0.01)
    rt.refuse_waiting({"lazy"}, "'lazy' failed to start: the server exited with code 1.")
    with pytest.raises(_Refusal) as exc:
        await waiting
    assert (exc.value.status, exc.value.message) == (
        503,
        "'lazy' failed to start: the server exited with code 1.",
    )
    with pytest.raises(_Refusal) as exc:
        await router(FakeLoader(0.05), {}).acquire("lazy", frozenset())
    assert (exc.value.status, exc.value.message) == (
        503,
        "'lazy' did not finish loading within 0.05s.",
    )


async def test_a_client_leaving_while_its_start_failed_does_not_raise_twice():
    rt = router(FakeLoader(5.0), {})
    waiting = asyncio.ensure_future(rt.acquire("lazy", frozenset()))
    await asyncio.sleep(0.01)
    rt.refuse_waiting({"lazy"}, "failed")
    waiting.cancel()  # the cancel and the refusal race
    with pytest.raises(asyncio.CancelledError):  # not the refusal: nobody reads it now
        await waiting
    assert rt.in_flight == {}


# --- interactive before batch -------------------------------------------------------


def test_the_next_waiter_is_the_oldest_interactive_but_batch_gets_one_slot_in_four():
    from llama_orchestrator.router.slots import BATCH_SHARE, next_waiter

    assert BATCH_SHARE == 4
    assert next_waiter([], 0) is None
    waiting = [(True, 5), (False, 5), (True, 9), (False, 5)]  # (batch, priority), oldest first
    assert [next_waiter(waiting, s) for s in range(5)] == [1, 1, 1, 2, 2]
    assert next_waiter([(True, 5), (True, 9), (True, 9)], 0) == 1  # priority, then age
    assert next_waiter([(False, 1), (False, 9)], 99) == 0  # no batch: priority is batch's only


async def test_interactive_requests_go_first_batch_keeps_its_share_and_waits_are_counted():
    from llama_orchestrator.router.slots import Slots

    one = Replica("a-1", "a", (), "127.0.0.1", 9, slots=1)
    t = [0.0]
    waits: list[tuple[str, float]] = []
    slots = Slots(
        RouterSettings(),
        lambda: [one],
        clock=lambda: t[0],
        on_wait=lambda c, s: waits.append((c, s)),
    )
    assert await slots.acquire("a", frozenset()) == one  # a free slot: taken at once
    served: list[str] = []

    async def ask(label: str, batch: bool, priority: int = 5) -> None:
        await slots.acquire("a", frozenset(), batch=batch, priority=priority)
        served.append(label)

    tasks = [asyncio.ensure_future(ask(f"b{i}", True, 9 if i == 3 else 5)) for i in range(4)]
    tasks += [asyncio.ensure_future(ask(f"i{i}", False)) for i in range(8)]
    await asyncio.sleep(0)
    assert slots.queue_depth("batch") == 4 and slots.queue_depth("interactive") == 8
    for _ in range(12):  # one slot frees at a time, a second apart
        t[0] += 1.0
        slots.release(one)
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    # three interactive, then batch (the priority-9 one first), and so on; none starves
    assert served == ["i0", "i1", "i2", "b3", "i3", "i4", "i5", "b0", "i6", "i7", "b1", "b2"]
    assert slots.queue_depth() == 0
    by_class = {c: [s for k, s in waits if k == c] for c in ("interactive", "batch")}
    assert by_class["interactive"][:3] == [1.0, 2.0, 3.0] and by_class["batch"][0] == 4.0
    assert len(by_class["batch"]) == 4 and len(by_class["interactive"]) == 8


def test_batch_requests_are_told_apart_by_header_or_key():
    from llama_orchestrator.wire.server import Request

    rt = Router(RouterSettings(batch_api_keys=["nightly"]), lambda: {}, set)
    ask = lambda **h: rt.is_batch(Request("POST", "/v1/chat/completions", h))  # noqa: E731
    assert ask(**{"x-priority": "batch"}) and ask(**{"x-priority": " Batch "})
    assert ask(authorization="Bearer nightly")
    assert not ask() and not ask(**{"x-priority": "interactive"})
    assert not ask(authorization="Bearer someone-else")
