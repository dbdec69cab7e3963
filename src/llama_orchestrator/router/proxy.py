"""The router: one OpenAI-compatible endpoint in front of the healthy
instances (DESIGN §6). Choosing is `balance`'s; this module keeps the slot
counts and the bounded per-model queues, and forwards
(over `upstream`, answering through `front`).

What is retried (`may_retry`): a replica that could not be reached, or that
answered 5xx while another can take the request, is skipped transparently.
A replica that took the request and died before any byte of an answer (a
`kill -9`, a crash) is replaced once: a request that crashes servers is not
replayed into every replica. Nothing is retried once the answer began.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from llama_orchestrator.config import RouterSettings
from llama_orchestrator.router.balance import Replica, candidates, least_busy, model_names
from llama_orchestrator.router.front import Reply, Request, Stream
from llama_orchestrator.router.upstream import Exchange, Upstream, UpstreamError

__all__ = [
    "Router",
    "RouterMetrics",
    "RouterError",
    "openai_error",
    "may_retry",
    "pass_on",
    "MAX_REPLAYS",
]

RETRY_AFTER = "1"
#: how many times a request whose replica died while working on it is sent again
MAX_REPLAYS = 1
#: not passed on: they describe our connection to the instance (the length
#: and framing of the client's answer are the front's)
_HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length"}
_JSON = ("content-type", "application/json")


def openai_error(status: int, message: str, kind: str, **extra: Any) -> Reply:
    headers = [_JSON, ("retry-after", RETRY_AFTER)] if status in (429, 503) else [_JSON]
    body = {"error": {"message": message, "type": kind, "code": status, **extra}}
    return Reply(status, json.dumps(body).encode(), headers)


def pass_on(headers: list[tuple[bytes, bytes]]) -> tuple[bytes, bool]:
    """An instance's answer headers as the client gets them (encoded, less the
    hop-by-hop ones), and whether the answer is an event stream."""
    lines = []
    streamed = False
    for name, value in headers:
        lower = name.lower()
        if lower in _HOP_BY_HOP:
            continue
        if lower == b"content-type" and b"event-stream" in value:
            streamed = True
        lines.append(b"%s: %s\r\n" % (name, value))
    return b"".join(lines), streamed


def _headers_for(r: Replica, content_type: str) -> dict[str, str]:
    """What a request to `r` carries besides its body (and the instance's key)."""
    headers = {"Content-Type": content_type}
    if r.api_key:
        headers["Authorization"] = f"Bearer {r.api_key}"
    return headers


def may_retry(error: UpstreamError, replays: int) -> bool:
    """Whether a request that failed on a replica goes to another one:
    never once the answer began; once (MAX_REPLAYS) when the replica took it
    and died; always when it was never delivered."""
    if error.answered:
        return False
    return not error.delivered or replays < MAX_REPLAYS


class _Refusal(Exception):
    """No slot for the request: 503 (none healthy) or 429 (busy)."""

    def __init__(self, status: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind

    @property
    def response(self) -> Reply:
        return openai_error(self.status, self.message, self.kind)


class RouterError(Exception):
    """A request the router made for the daemon itself (a plan's task) failed.
    `final`: the instance refused the request itself (4xx): sending it again
    cannot help. `busy`: it was never sent (no healthy instance, or no slot
    in time): not the request's fault, try again later."""

    def __init__(self, message: str, final: bool = False, busy: bool = False) -> None:
        super().__init__(message)
        self.final = final
        self.busy = busy


@dataclass
class _Waiter:
    future: asyncio.Future[Replica]
    exclude: frozenset[str]


class Loader(Protocol):
    """Starts on-demand instances (the daemon's `OnDemand`)."""

    def wake(self, model: str) -> float | None:
        """Start (or keep starting) what serves `model` when it is on demand:
        how long a request may wait for it to load; None when nothing is."""

    def models(self) -> set[str]:
        """The aliases a request may name although nothing serves them yet."""

    def idle(self, name: str) -> None:
        """The last request in flight on `name` ended."""


@dataclass
class RouterMetrics:
    """Hooks the daemon's Prometheus metrics fill in (no-ops by default)."""

    request: Callable[[str, str, int, float], None] = lambda model, inst, status, secs: None
    first_byte: Callable[[str, float], None] = lambda model, secs: None
    retry: Callable[[str], None] = lambda model: None


@dataclass
class Router:
    settings: RouterSettings
    #: the instances that take requests now: healthy, not draining (the daemon's board)
    healthy: Callable[[], dict[str, Replica]]
    #: every model name a config offers (aliases, tags:...), healthy or not
    known: Callable[[], set[str]]
    metrics: RouterMetrics = field(default_factory=RouterMetrics)
    in_flight: dict[str, int] = field(default_factory=dict)
    #: when each instance last began or ended a request (time.time())
    last_used: dict[str, float] = field(default_factory=dict)
    loader: Loader | None = None
    upstream: Upstream = field(default_factory=Upstream)
    _queues: dict[str, deque[_Waiter]] = field(default_factory=dict)
    #: who waits for the requests in flight on an instance to end (`settle`)
    _settling: dict[str, asyncio.Event] = field(default_factory=dict)

    # --- slots and queues -----------------------------------------------------

    def replicas(self) -> list[Replica]:
        return list(self.healthy().values())

    def models(self) -> list[str]:
        """What /v1/models lists: healthy aliases and those loaded on demand."""
        lazy = self.loader.models() if self.loader is not None else set()
        return sorted(set(model_names(self.replicas())) | lazy)

    def queue_depth(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def _take(self, r: Replica) -> Replica:
        self.in_flight[r.name] = self.in_flight.get(r.name, 0) + 1
        self.last_used[r.name] = time.time()
        return r

    def release(self, r: Replica) -> None:
        left = self.in_flight[r.name] = max(0, self.in_flight.get(r.name, 0) - 1)
        self.last_used[r.name] = time.time()
        self.wake()
        if not left:
            settled = self._settling.pop(r.name, None)
            if settled is not None:
                settled.set()
            if self.loader is not None:
                self.loader.idle(r.name)

    def waiting_models(self) -> list[str]:
        """Models some request is queued for."""
        return [m for m, q in self._queues.items() if any(not w.future.done() for w in q)]

    def refuse_waiting(self, models: set[str], message: str) -> None:
        """Answer every request queued for `models` with 503 and `message`
        (what they wait for will not come: an on-demand start failed)."""
        for model in models:
            for waiter in self._queues.pop(model, deque()):
                if not waiter.future.done():
                    waiter.future.set_exception(_Refusal(503, message, "unavailable"))

    def wake(self) -> None:
        """Give freed (or newly healthy) slots to the oldest waiters, per model."""
        if not any(self._queues.values()):
            return  # the common case: nobody waits
        replicas = self.replicas()
        for model, queue in self._queues.items():
            while queue:
                head = queue[0]
                if head.future.done():
                    queue.popleft()
                    continue
                r = least_busy(candidates(model, replicas), self.in_flight, head.exclude)
                if r is None:
                    break
                queue.popleft()
                head.future.set_result(self._take(r))

    async def acquire(self, model: str, exclude: frozenset[str]) -> Replica:
        """A slot on the least busy replica, waiting in the model's FIFO queue
        when all are busy. Raises _Refusal (503 none healthy, 429 queue full
        or waited too long)."""
        serving = candidates(model, self.replicas())
        cands = [c for c in serving if c.name not in exclude]
        timeout = self.settings.queue_timeout
        loading = None  # seconds to wait for an on-demand instance to load
        if not cands:
            if not serving and self.loader is not None:
                loading = self.loader.wake(model)
            if loading is None:
                raise _Refusal(
                    503,
                    f"No healthy instance serves '{model}' right now; try again shortly.",
                    "unavailable",
                )
            timeout = loading
        queue = self._queues.setdefault(model, deque())
        if not queue and cands:
            r = least_busy(cands, self.in_flight, exclude)
            if r is not None:
                return self._take(r)
        if len(queue) >= self.settings.max_queue:
            raise _Refusal(429, f"Every slot for '{model}' is busy and the queue is full.", "busy")
        waiter = _Waiter(asyncio.get_running_loop().create_future(), exclude)
        queue.append(waiter)
        try:
            await asyncio.wait({waiter.future}, timeout=timeout)
        except asyncio.CancelledError:  # the client left while waiting
            if (
                waiter.future.done()
                and not waiter.future.cancelled()
                and waiter.future.exception() is None
            ):
                self.release(waiter.future.result())  # granted at that very moment
            else:
                self._forget(queue, waiter)
            raise
        if not waiter.future.done():
            self._forget(queue, waiter)
            if loading is not None:
                raise _Refusal(
                    503, f"'{model}' did not finish loading within {loading:g}s.", "unavailable"
                )
            raise _Refusal(429, f"Every slot for '{model}' stayed busy for {timeout:g}s.", "busy")
        return waiter.future.result()  # or the refusal an on-demand start failed with

    @staticmethod
    def _forget(queue: deque[_Waiter], waiter: _Waiter) -> None:
        waiter.future.cancel()
        if waiter in queue:
            queue.remove(waiter)

    async def settle(self, name: str, timeout: float) -> None:
        """Wait (at most `timeout`) until no request is in flight on `name`.
        The caller has taken it off the board first, so no new one arrives."""
        if self.in_flight.get(name, 0) > 0:
            settled = self._settling.setdefault(name, asyncio.Event())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(settled.wait(), timeout)

    # --- forwarding -------------------------------------------------------------

    async def close(self) -> None:
        self.upstream.close()

    async def forward(self, request: Request, model: str) -> Reply | Stream:
        """Sends the request to the least busy replica serving `model`
        (retrying as `may_retry` allows). Cancelling it (the client left)
        closes the upstream connection, which frees the llama-server slot."""
        start = time.perf_counter()
        tried: set[str] = set()
        replays = 0
        last_error = ""
        content_type = request.headers.get("content-type", "application/json")
        while True:
            try:
                r = await self.acquire(model, frozenset(tried))
            except _Refusal as refusal:
                if tried:  # every replica failed before answering
                    return openai_error(
                        503,
                        f"Every instance serving '{model}' failed this request ({last_error}).",
                        "unavailable",
                    )
                self.metrics.request(model, "", refusal.status, 0.0)
                return refusal.response
            try:
                answer = await self.upstream.open(
                    r.host,
                    r.port,
                    request.method,
                    request.path,
                    _headers_for(r, content_type),
                    request.body,
                )
            except UpstreamError as exc:
                self.release(r)
                if not may_retry(exc, replays):
                    return self._broken(model, r, exc, start)
                replays += exc.delivered
                tried.add(r.name)
                last_error = f"{r.name}: {exc}"
                self.metrics.retry(model)
                continue
            except BaseException:
                self.release(r)
                raise
            if answer.status >= 500 and len(tried) + 1 < len(
                candidates(model, self.healthy().values())
            ):
                answer.close()
                self.release(r)
                tried.add(r.name)
                last_error = f"{r.name}: HTTP {answer.status}"
                self.metrics.retry(model)
                continue
            return await self._answer(answer, r, model, start)

    async def _answer(
        self, answer: Exchange, r: Replica, model: str, start: float
    ) -> Reply | Stream:
        raw, streamed = pass_on(answer.headers)
        if streamed:
            return Stream(answer.status, self._relay(answer, r, model, start), raw_headers=raw)
        try:
            body = await answer.body()
        except UpstreamError as exc:
            return self._broken(model, r, exc, start)
        finally:
            self.upstream.finish(answer)
            self.release(r)
        elapsed = time.perf_counter() - start
        self.metrics.first_byte(model, elapsed)
        self.metrics.request(model, r.name, answer.status, elapsed)
        return Reply(answer.status, body, raw_headers=raw)

    def _broken(self, model: str, r: Replica, exc: UpstreamError, start: float) -> Reply:
        self.metrics.request(model, r.name, 502, time.perf_counter() - start)
        return openai_error(
            502, f"The instance '{r.name}' failed while answering ({exc}).", "upstream_error"
        )

    async def _relay(
        self, answer: Exchange, r: Replica, model: str, start: float
    ) -> AsyncIterator[bytes]:
        """Chunks as they arrive; a client that leaves closes the upstream
        connection, which makes llama-server stop generating and free the slot."""
        first = True
        try:
            async for chunk in answer.chunks():
                if first:
                    self.metrics.first_byte(model, time.perf_counter() - start)
                    first = False
                yield chunk
        finally:
            self.upstream.finish(answer)  # closed unless read to its end
            self.release(r)
            self.metrics.request(model, r.name, answer.status, time.perf_counter() - start)

    async def complete(
        self, model: str, body: dict[str, Any], path: str = "/v1/chat/completions"
    ) -> tuple[str, dict[str, Any]]:
        """One request on behalf of the daemon (a plan's llm task), balanced and
        queued like any client's: (the instance that answered, its JSON).
        Raises RouterError. Cancelling it closes the upstream connection."""
        try:
            r = await self.acquire(model, frozenset())
        except _Refusal as refusal:
            raise RouterError(refusal.message, busy=True) from None
        start = time.perf_counter()
        status = 0
        try:
            try:
                answer = await self.upstream.open(
                    r.host,
                    r.port,
                    "POST",
                    path,
                    _headers_for(r, "application/json"),
                    json.dumps(body).encode(),
                )
                try:
                    status = answer.status
                    raw = await answer.body()
                finally:
                    self.upstream.finish(answer)
            except UpstreamError as exc:
                raise RouterError(f"{r.name}: {exc}") from None
            try:
                data = json.loads(raw)
            except ValueError:
                data = None
            if status >= 400 or not isinstance(data, dict):
                error = data.get("error") if isinstance(data, dict) else None
                detail = error.get("message") if isinstance(error, dict) else None
                detail = detail or raw[-300:].decode("utf-8", "replace")
                final = 400 <= status < 500 and status not in (408, 429)
                raise RouterError(f"{r.name} answered HTTP {status}: {detail}", final)
            return r.name, data
        finally:
            self.release(r)
            self.metrics.request(model, r.name, status or 499, time.perf_counter() - start)

    # --- the proxied routes ----------------------------------------------------

    async def handle(self, request: Request) -> Reply | Stream:
        """POST /v1/chat/completions, /v1/completions, /v1/embeddings, /completion
        (the body's size was checked on the head, by the site)."""
        try:
            data = json.loads(request.body)
        except ValueError as exc:
            return openai_error(
                400, f"The request body is not valid JSON ({exc}).", "invalid_request_error"
            )
        if not isinstance(data, dict):
            return openai_error(
                400, "The request body must be a JSON object.", "invalid_request_error"
            )
        model = data.get("model")
        known = self.known()
        if model is None and request.path == "/completion":
            aliases = sorted(m for m in known if not m.startswith("tags:"))
            model = aliases[0] if len(aliases) == 1 else None
        if not isinstance(model, str) or model not in known:
            available = sorted(m for m in known if not m.startswith("tags:"))
            what = f"The model '{model}' does not exist" if model else "Name a model"
            return openai_error(
                404 if model else 400,
                f"{what}; available: {', '.join(available) or 'none'}.",
                "model_not_found" if model else "invalid_request_error",
                available=available,
            )
        return await self.forward(request, model)
