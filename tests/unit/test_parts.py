"""The daemon's parts, built as `daemon.main` builds them, on the fake world:
an instance started through the supervisor is served by the router, and
stopping the parts stops supervising."""

from __future__ import annotations

import random

from llama_orchestrator.config.settings import Settings
from llama_orchestrator.daemon.parts import Parts
from llama_orchestrator.engine.health import HEALTHY
from llama_orchestrator.home import Home
from llama_orchestrator.store.database import Store
from llama_orchestrator.store.unsaved import Unsaved
from llama_orchestrator.wire.pool import Pool
from tests.fakes.fake_effects import FakeEffects


async def test_the_daemons_parts_run_on_the_fake_world(tmp_path):
    home = Home(tmp_path / "home")
    (home.root / "instances").mkdir(parents=True)
    fx: FakeEffects
    store = Store.open(home.db_path, clock=lambda: fx.t, unsaved=Unsaved())
    fx = FakeEffects(store)
    written: list[int] = []

    async def in_store(fn):
        written.append(1)
        return fn(store)

    parts = Parts.build(home, Settings(), fx, Pool(), store, in_store, random.Random(1))
    fx.add("a", model={"alias": "tiny"})
    fx.health["a"] = HEALTHY
    await parts.start()
    try:
        (result,) = await parts.sup.up(["a"])
        assert result.outcome == "started"
        await fx.advance(2)  # probed healthy: on the board, so the router serves it
        assert parts.router.models() == ["tiny"]
        assert [r.name for r in parts.router.replicas()] == ["a"]
        assert store.get("a").state == "healthy"  # type: ignore[union-attr]
        assert written  # the usage writer read the last day's spending through in_store
    finally:
        await parts.stop(stop_instances=True)
        await parts.close()
    assert fx.running("a") == []  # stopped with the parts, as `daemon stop --all` does
    assert parts.router.models() == []
    store.close()
