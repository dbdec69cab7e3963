"""On-demand in the daemon on a fake world (fake processes and GPUs, a clock
that moves only when the test says): starts, idle stops and VRAM swaps."""

from __future__ import annotations

import asyncio

import pytest

from llama_orchestrator.config.settings import Settings
from llama_orchestrator.daemon.ondemand import OnDemand
from llama_orchestrator.engine.health import DOWN, HEALTHY
from llama_orchestrator.errors import StartFailed
from llama_orchestrator.gpus.discover import GpuInfo
from llama_orchestrator.router.slots import Refusal
from tests.fakes.fake_effects import World

CARD_MIB = 8192
NEEDS_MIB = 5000  # two of them do not fit on the card


async def on_demand(w: World, settings: Settings | None = None) -> OnDemand:
    await w.sup.refresh()  # the configs the daemon read at start
    od = OnDemand(w.sup, w.slots, settings or Settings())
    od.start()
    return od


def lazy(w: World, name: str, **overrides):
    w.fx.add(name, on_demand={"idle_ttl": 5, "load_timeout": 30}, **overrides)
    w.fx.health[name] = HEALTHY


def on_card(w: World, name: str) -> None:
    lazy(w, name, gpu={"backend": "cuda", "device_id": 0, "vram_mib": NEEDS_MIB})
    w.fx.cards = lambda: [
        GpuInfo(0, "card", "cuda", CARD_MIB, NEEDS_MIB * sum(len(w.fx.running(n)) for n in "ab"))
    ]


async def test_requests_start_it_once_and_it_stops_after_idle_ttl(w):
    lazy(w, "od")
    od = await on_demand(w)
    assert od.wake("od") == 30 and od.wake("od") == 30  # a second request: no second start
    await w.fx.settle()
    assert len(w.fx.procs) == 1
    await w.fx.advance(0.2)
    assert w.sup.healthy("od") and "od" in w.board.replicas
    r = await w.slots.acquire("od", frozenset())
    await w.fx.advance(20)  # busy: the idle clock does not run
    assert w.fx.running("od")
    w.slots.release(r)
    await w.fx.advance(4)
    assert w.fx.running("od")
    await w.fx.advance(2)
    assert not w.fx.running("od") and "idle_stop" in w.kinds("od")
    assert w.row("od").last_used_at is not None  # what ps and the dashboard show
    await od.close()


async def test_a_start_swaps_out_the_idle_one_that_holds_the_vram(w):
    on_card(w, "a")
    on_card(w, "b")
    od = await on_demand(w)
    od.wake("a")
    await w.fx.advance(0.3)
    assert w.sup.healthy("a")
    od.wake("b")
    await w.fx.advance(0.5)
    assert not w.fx.running("a") and w.sup.healthy("b")
    assert "swapped_out" in w.kinds("a") and "on_demand_start" in w.kinds("b")
    await od.close()


async def test_a_busy_instance_is_never_swapped_out_the_start_waits_for_it(w):
    on_card(w, "a")
    on_card(w, "b")
    od = await on_demand(w)
    od.wake("a")
    await w.fx.advance(0.3)
    r = await w.slots.acquire("a", frozenset())  # a request in flight on a
    od.wake("b")
    await w.fx.advance(3)
    assert w.fx.running("a") and not w.fx.running("b")
    assert "on_demand_wait" in w.kinds("b")
    w.slots.release(r)
    await w.fx.advance(1.5)
    assert not w.fx.running("a") and w.sup.healthy("b")
    await od.close()


async def test_a_start_that_fails_answers_the_waiting_requests_at_once(w):
    lazy(w, "od")
    w.fx.spawn_fails["od"] = StartFailed("Port 9000 is taken.")
    od = await on_demand(w)
    waiting = asyncio.ensure_future(w.slots.acquire("od", frozenset(), od.wake("od")))
    await w.fx.settle()
    with pytest.raises(Refusal, match="cannot start: Port 9000 is taken"):
        await waiting
    assert "start_failed" in w.kinds("od")
    await od.close()


async def test_a_server_that_dies_while_loading_answers_the_queue_with_how(w):
    lazy(w, "od", restart_policy={"mode": "no"})
    w.fx.health["od"] = DOWN
    od = await on_demand(w)
    waiting = asyncio.ensure_future(w.slots.acquire("od", frozenset(), od.wake("od")))
    await w.fx.advance(0.2)
    w.fx.proc("od").end(code=1)
    await w.fx.advance(0.1)
    with pytest.raises(Refusal, match="failed to start: the server exited with code 1"):
        await waiting
    await od.close()


async def test_a_server_that_dies_at_once_answers_the_queue_with_how_not_stopped(w):
    """Start's answer may come while the runner has forgotten the process but
    not yet read how it ended (seen once in CI as "the server stopped.")."""
    lazy(w, "od", restart_policy={"mode": "no"})
    w.fx.health["od"] = DOWN
    w.fx.dies_at_once["od"] = 1
    w.fx.exit_info_lag = 5
    od = await on_demand(w)
    waiting = asyncio.ensure_future(w.slots.acquire("od", frozenset(), od.wake("od")))
    await w.fx.advance(0.2)
    with pytest.raises(Refusal, match="failed to start: the server exited with code 1"):
        await waiting
    await od.close()


async def test_an_on_demand_start_records_its_use_before_any_request_is_answered(w):
    lazy(w, "od")
    od = await on_demand(w)
    waiting = asyncio.ensure_future(w.slots.acquire("od", frozenset(), od.wake("od")))
    await w.fx.settle()  # started: no idle-clock tick has run yet (the clock has not moved)
    assert w.row("od").last_used_at == pytest.approx(w.fx.t)  # what ps shows at once
    await w.fx.advance(0.2)
    w.slots.release(await waiting)
    await od.close()
