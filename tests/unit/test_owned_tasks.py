"""The daemon's owned background tasks: started, renewed after a failure,
cancelled one by one or all at once, and never lost."""

from __future__ import annotations

import asyncio
import logging

from llama_orchestrator.daemon.tasks import OwnedTasks


async def test_a_failing_loop_is_logged_and_made_anew_after_its_pause(caplog):
    runs: list[int] = []
    again = asyncio.Event()

    async def flaky() -> None:
        runs.append(len(runs))
        if len(runs) < 3:
            raise RuntimeError("a bug of ours")
        again.set()
        await asyncio.sleep(3600)

    tasks = OwnedTasks("peers")
    with caplog.at_level(logging.ERROR, logger="llama_orchestrator.daemon"):
        tasks.start(flaky, key="b", renew_after=0.01)
        await asyncio.wait_for(again.wait(), 5)
    assert runs == [0, 1, 2]
    failed = [r for r in caplog.records if "peers: task 'b' failed; again in 0.01s" in r.message]
    assert len(failed) == 2 and all(r.exc_info for r in failed)  # with the traceback
    await tasks.close()
    assert "b" not in tasks


async def test_one_failure_without_renewal_ends_that_task_only(caplog):
    async def broken() -> None:
        raise ValueError("no")

    async def steady() -> None:
        await asyncio.sleep(3600)

    tasks = OwnedTasks("leases")
    with caplog.at_level(logging.ERROR, logger="llama_orchestrator.daemon"):
        done = tasks.start(broken, key="once")
        tasks.start(steady, key="loop")
        await asyncio.wait_for(done, 5)
    assert "once" not in tasks and "loop" in tasks
    assert any("leases: task 'once' failed" in r.message for r in caplog.records)
    await tasks.close()


async def test_cancel_and_restart_under_a_key_and_close_awaits_every_end():
    ended: list[str] = []

    def work(name: str):
        async def run() -> None:
            try:
                await asyncio.sleep(3600)
            finally:
                ended.append(name)

        return run

    tasks = OwnedTasks("upstreams")
    first = tasks.start(work("first"), key="u")
    await asyncio.sleep(0)  # each one under way before the next step
    second = tasks.start(work("second"), key="u")  # the same key: the first is cancelled
    await asyncio.sleep(0)
    assert "first" in ended and first.cancelled()
    tasks.start(work("loose"))  # no key: one of its own
    await asyncio.sleep(0)
    tasks.cancel("u")
    assert "u" not in tasks
    await tasks.close()  # awaits the cancelled one's end too
    assert sorted(ended) == ["first", "loose", "second"]  # every one ended, none left running
    assert second.done()
