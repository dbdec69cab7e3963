"""The fake world the daemon's unit tests run on (see fake_effects)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from llama_orchestrator.home import Home
from tests.unit.fake_effects import World


@pytest.fixture()
async def w(tmp_path) -> AsyncIterator[World]:
    """A supervisor on fake effects with a real store; shut down afterwards."""
    world = World(Home(tmp_path / "home"))
    yield world
    await world.sup.shutdown(stop_instances=False)
    world.store.close()
