"""The fake world the daemon's unit tests run on (see fake_effects), and
what keeps the unit tests hermetic."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import pytest

from llama_orchestrator.home import Home
from tests.fakes.fake_effects import World


@pytest.fixture()
async def w(tmp_path) -> AsyncIterator[World]:
    """A supervisor on fake effects with a real store; shut down afterwards."""
    world = World(Home(tmp_path / "home"))
    yield world
    await world.sup.shutdown(stop_instances=False)
    world.store.close()


@pytest.fixture(autouse=True)
def _no_real_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """No unit test needs, or finds, a real llama-server: the binary that the
    config checks look for is one that exists (the interpreter). A test of
    finding the binary sets its own."""
    monkeypatch.setenv("LLAMA_SERVER_BIN", sys.executable)
