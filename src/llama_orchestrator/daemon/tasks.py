"""Background tasks that one part of the daemon owns (its loops, its
watches): started by that part, never lost (a failure is logged, not left
to "Task exception was never retrieved"), made anew after a pause when the
part asks for that, and all cancelled and awaited when the part closes.

    tasks = OwnedTasks("peers")
    tasks.start(lambda: self._watch(peer), key=peer.name, renew_after=1.0)
    tasks.cancel(peer.name)      # one of them
    await tasks.close()          # all of them
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Hashable

__all__ = ["OwnedTasks"]

log = logging.getLogger("llama_orchestrator.daemon")

Work = Callable[[], Awaitable[None]]


class OwnedTasks:
    def __init__(
        self, owner: str, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    ) -> None:
        self.owner = owner  # named in the log when one of them fails
        self._sleep = sleep  # the pause before a renewal (the fake world's clock in tests)
        self._tasks: dict[Hashable, asyncio.Task[None]] = {}
        self._ending: set[asyncio.Task[None]] = set()  # cancelled one by one, still ending
        self._next = 0

    def start(
        self, work: Work, *, key: Hashable | None = None, renew_after: float | None = None
    ) -> asyncio.Task[None]:
        """Run `work()` in a task of its own; a task already under `key` is
        cancelled first. A failure is logged, and with `renew_after` the work
        starts again after that many seconds (a loop must outlive a bug)."""
        if key is None:
            key, self._next = ("task", self._next), self._next + 1
        self.cancel(key)
        task = asyncio.create_task(self._run(work, key, renew_after))
        self._tasks[key] = task
        task.add_done_callback(lambda done: self._ended(key, done))
        return task

    def _ended(self, key: Hashable, task: asyncio.Task[None]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]

    def __contains__(self, key: Hashable) -> bool:
        return key in self._tasks

    def cancel(self, key: Hashable) -> None:
        """Cancel the task under `key`, if any (its end is awaited by `close`);
        a task that cancels itself this way is only forgotten: it goes on."""
        task = self._tasks.pop(key, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            self._ending.add(task)
            task.add_done_callback(self._ending.discard)

    def forget(self, key: Hashable) -> None:
        """Drop the task under `key` without cancelling it: its work is done
        (a timer that fired), and what asks for `key` must not see it."""
        self._tasks.pop(key, None)

    async def close(self) -> None:
        """Cancel every task and wait until each has ended."""
        tasks = [*self._tasks.values(), *self._ending]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, work: Work, key: Hashable, renew_after: float | None) -> None:
        while True:
            try:
                await work()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                again = f"; again in {renew_after:g}s" if renew_after is not None else ""
                log.exception(f"{self.owner}: task {key!r} failed{again}")
                if renew_after is None:
                    return
            await self._sleep(renew_after)
            log.info(f"{self.owner}: task {key!r} runs again")
