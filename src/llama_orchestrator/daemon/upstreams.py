"""The daemon's external upstreams: each one checked with a cheap
`GET <url>/models` at its interval (further apart while it fails: never a
flood on an API that is down), on the board as a replica while it answers,
off it when it does not (its requests then fail fast: 503 + Retry-After).

The configs are read again every few seconds, as the supervisor reads the
instances'; the keys at every check and request (`router.external`). What
each request cost is written to the state database in batches, off the
event loop (`UsageWriter`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from llama_orchestrator.config.upstream import UpstreamConfig
from llama_orchestrator.daemon.board import Board
from llama_orchestrator.daemon.tasks import OwnedTasks
from llama_orchestrator.errors import OrchError
from llama_orchestrator.router.balance import Replica
from llama_orchestrator.router.external import Externals
from llama_orchestrator.store.database import Store
from llama_orchestrator.store.rows import UsageRecord
from llama_orchestrator.upstreams import DAY_S, check_delay
from llama_orchestrator.wire.pool import Pool, origin

__all__ = ["Upstreams", "UpstreamState", "UsageWriter", "replica_of", "CONFIG_POLL_S"]

log = logging.getLogger("llama_orchestrator.daemon")

#: how often the upstreams' configs are read again
CONFIG_POLL_S = 5.0
#: how often what upstream requests cost is written
USAGE_FLUSH_S = 1.0

#: get(url, headers, timeout) -> HTTP status and the start of the body; raises OSError
Getter = Callable[[str, dict[str, str], float], Awaitable[tuple[int, str]]]
#: add_event(instance, kind, message)
EventSink = Callable[[str, str, str], None]


@dataclass
class UpstreamState:
    url: str
    state: str = "checking"  # then "healthy" or "unhealthy"
    error: str | None = None
    checked_at: float | None = None
    next_check_at: float | None = None
    failures: int = 0
    #: refused the key on a request: out of service until then, whatever
    #: its checks find (a `/models` that needs no key passes them)
    held_until: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "state": self.state,
            "error": self.error,
            "checked_at": self.checked_at,
            "next_check_at": self.next_check_at,
        }


def replica_of(name: str, cfg: UpstreamConfig) -> Replica:
    """What the router sees of an upstream that answers."""
    host, port, tls = origin(cfg.upstream.url)
    return Replica(
        name=name,
        alias=cfg.alias_or(name),
        tags=tuple(cfg.tags),
        host=host,
        port=port,
        slots=cfg.upstream.max_concurrent,
        remote=cfg.remote_model(name),
        base=urlsplit(cfg.upstream.url).path.rstrip("/"),
        tls=tls,
    )


def getter(pool: Pool) -> Getter:
    """GET through the daemon's one HTTP client (redirects not followed)."""

    async def get(url: str, headers: dict[str, str], timeout: float) -> tuple[int, str]:
        try:
            status, body = await asyncio.wait_for(pool.fetch_url(url, "GET", headers), timeout)
        except asyncio.TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
            raise OSError(f"no answer within {timeout:g}s") from None
        return status, body[:300]

    return get


class Upstreams:
    def __init__(
        self,
        load: Callable[[], Awaitable[dict[str, tuple[UpstreamConfig, Path]]]],
        board: Board,
        externals: Externals,
        add_event: EventSink,
        get: Getter,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._load = load
        self.board = board
        self.externals = externals
        self._event = add_event
        self.clock = clock
        self._get = get
        self.states: dict[str, UpstreamState] = {}
        self._configs: dict[str, tuple[UpstreamConfig, Path]] = {}
        self._tasks = OwnedTasks("upstreams")  # the config poll, one watch per upstream

    async def start(self) -> None:
        await self.refresh()
        self._tasks.start(self._poll, key="poll", renew_after=CONFIG_POLL_S)

    async def refresh(self) -> None:
        """Read the configs again: watch new or changed upstreams, forget removed ones."""
        configs = await self._load()
        for name in [n for n in self._configs if n not in configs]:
            self._forget(name)
        for name, (cfg, folder) in configs.items():
            if self._configs.get(name) == (cfg, folder):
                continue
            self._forget(name)
            self._configs[name] = (cfg, folder)
            self.externals.set(name, cfg, folder)
            self.states[name] = UpstreamState(cfg.upstream.url)
            self._tasks.start(partial(self._watch, name, cfg), key=name, renew_after=1.0)
        self.board.remote_known = {
            n for name, (cfg, _) in configs.items() for n in _names(name, cfg)
        }

    def _forget(self, name: str) -> None:
        self._tasks.cancel(name)
        self._configs.pop(name, None)
        self.states.pop(name, None)
        self.externals.drop(name)
        self.board.publish(name, None)

    async def close(self) -> None:
        await self._tasks.close()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(CONFIG_POLL_S)
            try:
                await self.refresh()
            except Exception:  # a config that cannot be read now: the next look tries again
                log.exception("reading the upstreams' configs failed")

    async def _watch(self, name: str, cfg: UpstreamConfig) -> None:
        state = self.states[name]
        hc = cfg.healthcheck
        while True:
            why = await self._check(name, cfg)
            now = self.clock()
            if why is None and state.held_until is not None and now < state.held_until:
                why = state.error  # a request was refused: the check is not the word
            state.checked_at = now
            old = state.state
            if why is None:
                state.failures, state.error, state.state = 0, None, "healthy"
                self.board.publish(name, replica_of(name, cfg))
            else:
                state.failures += 1
                state.error = why
                if state.failures >= hc.retries:
                    state.state = "unhealthy"
                    self.board.publish(name, None)
            if state.state != old:
                message = (
                    f"upstream {cfg.upstream.url} answers"
                    if why is None
                    else f"upstream {cfg.upstream.url} does not answer: {why}"
                )
                self._event(name, f"upstream_{state.state}", message)
            delay = check_delay(hc.interval, state.failures)
            if state.held_until is not None and state.held_until > now:
                delay = min(delay, state.held_until - now)
            state.next_check_at = now + delay
            await asyncio.sleep(delay)

    def refused(self, name: str, why: str) -> None:
        """A request found the key refused (`Externals.refused`): out of service
        now, for a check interval that doubles with each refusal in a row, then
        tried again; said in an event and in `ps`."""
        state, known = self.states.get(name), self._configs.get(name)
        if state is None or known is None:
            return
        cfg = known[0]
        state.held_until = self.clock() + check_delay(
            cfg.healthcheck.interval, self.externals.refusals.get(name, 1)
        )
        state.error = why
        self.board.publish(name, None)
        if state.state != "unhealthy":
            state.state = "unhealthy"
            self._event(name, "upstream_unhealthy", f"upstream {cfg.upstream.url} {why}")

    async def _check(self, name: str, cfg: UpstreamConfig) -> str | None:
        """Why the upstream is not usable now (None: it is)."""
        try:
            key = self.externals.key(name)
        except OrchError as exc:
            return exc.message
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            status, body = await self._get(
                f"{cfg.upstream.url}/models", headers, cfg.healthcheck.timeout
            )
        except (OSError, asyncio.TimeoutError) as exc:
            return str(exc) or type(exc).__name__
        if status == 200:
            return None
        if status in (401, 403):
            return f"HTTP {status}: it refused the key (check it, and that it may list models)"
        return f"HTTP {status}: {body.strip()[:120]}"


def _names(name: str, cfg: UpstreamConfig) -> set[str]:
    from llama_orchestrator.config.validate import offered_names

    return offered_names({name: cfg})


class UsageWriter:
    """Upstream usage, written in batches off the event loop; the last day's
    read back at start, so the daily budgets hold across daemon restarts."""

    def __init__(self, in_thread: Callable[[Callable[[Store], Any]], Awaitable[Any]]) -> None:
        self._in_thread = in_thread
        self._pending: list[UsageRecord] = []
        self._tasks = OwnedTasks("usage writer")

    def add(self, record: UsageRecord) -> None:
        self._pending.append(record)

    async def start(self, externals: Externals, now: float) -> None:
        for u in await self._in_thread(lambda store: store.usage(since=now - DAY_S)):
            externals.spending.add(u.upstream, u.ts, u.cost)
        self._tasks.start(self._run, renew_after=USAGE_FLUSH_S)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(USAGE_FLUSH_S)
            await self.flush()

    async def flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            await self._in_thread(lambda store: store.add_usage(batch))
        except Exception:  # kept for the next flush (a full disk, a locked database)
            log.exception("writing upstream usage failed; it is tried again")
            self._pending[:0] = batch

    async def close(self) -> None:
        await self._tasks.close()
        await self.flush()
