import asyncio
import time

import pytest

from tests.fakes.fake_source import FakeSource


@pytest.fixture()
def source(tmp_path):
    return FakeSource(tmp_path / "logs")


async def until(predicate, timeout: float = 10.0) -> None:
    """Poll `predicate` (letting the app run) until true; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
