"""The router's slots and queues with an on-demand loader (no sockets)."""

from __future__ import annotations

import asyncio

import pytest

from llama_orchestrator.config import RouterSettings
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
