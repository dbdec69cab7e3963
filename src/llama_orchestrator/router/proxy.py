"""The router: one OpenAI-compatible endpoint in front of the healthy
instances (DESIGN §6). Choosing is `balance`'s; this module keeps the slot
counts, the bounded per-model queues and the draining set, and forwards.

Forwarding uses aiohttp: measured against httpx as the upstream client in
`bench/router.py` (httpx is markedly slower under concurrency, httpx #3215).
A failure before the first upstream byte (refused, reset, 5xx answer) is
retried on another replica; nothing is retried once bytes reached the client,
so a request that crashes a server is not replayed into every replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from llama_orchestrator.config import RouterSettings
from llama_orchestrator.router.balance import Replica, candidates, least_busy, model_names

__all__ = ["Router", "RouterMetrics", "RouterError", "openai_error"]

RETRY_AFTER = "1"
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "content-encoding",
}


def openai_error(status: int, message: str, kind: str, **extra: Any) -> JSONResponse:
    headers = {"Retry-After": RETRY_AFTER} if status in (429, 503) else None
    body = {"error": {"message": message, "type": kind, "code": status, **extra}}
    return JSONResponse(body, status_code=status, headers=headers)


class _ClientGone(Exception):
    pass


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (the body was read before)."""
    while (await receive())["type"] != "http.disconnect":
        pass


@contextlib.asynccontextmanager
async def _unless_client_leaves(receive: Receive) -> AsyncIterator[None]:
    """Runs the block; if the client disconnects meanwhile, the block is
    cancelled and _ClientGone raised. One watcher task, no task group: this
    wraps every proxied request."""
    this = asyncio.current_task()
    assert this is not None
    active = True

    def client_left(watcher: asyncio.Future[None]) -> None:
        if active and not watcher.cancelled():
            this.cancel()

    gone = asyncio.ensure_future(_disconnected(receive))
    gone.add_done_callback(client_left)
    try:
        yield
    except asyncio.CancelledError:
        if gone.done() and not gone.cancelled():
            if sys.version_info >= (3, 11):
                this.uncancel()  # the cancel was ours, now a _ClientGone
            raise _ClientGone from None
        raise
    finally:
        active = False
        gone.cancel()


class _Relay(Response):
    """A streamed answer passed on chunk by chunk (Starlette's StreamingResponse
    runs a task group per response to notice a disconnect; this, one task)."""

    def __init__(self, chunks: AsyncGenerator[bytes, None], status: int, headers: dict[str, str]):
        # not Response.__init__: it would add "content-length: 0"
        self.status_code = status
        self.background = None
        self.raw_headers = [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
        ]
        self.chunks = chunks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        try:
            async with contextlib.aclosing(self.chunks), _unless_client_leaves(receive):
                async for chunk in self.chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except _ClientGone:
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class _Refusal(Exception):
    """No slot for the request: 503 (none healthy) or 429 (busy)."""

    def __init__(self, status: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind

    @property
    def response(self) -> JSONResponse:
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
    #: the healthy instances now (the supervisor keeps this up to date)
    healthy: Callable[[], dict[str, Replica]]
    #: every model name a config offers (aliases, tags:...), healthy or not
    known: Callable[[], set[str]]
    metrics: RouterMetrics = field(default_factory=RouterMetrics)
    in_flight: dict[str, int] = field(default_factory=dict)
    #: when each instance last began or ended a request (time.time())
    last_used: dict[str, float] = field(default_factory=dict)
    draining: set[str] = field(default_factory=set)
    loader: Loader | None = None
    _queues: dict[str, deque[_Waiter]] = field(default_factory=dict)
    _session: aiohttp.ClientSession | None = None

    # --- slots and queues -----------------------------------------------------

    def replicas(self) -> list[Replica]:
        return [r for r in self.healthy().values() if r.name not in self.draining]

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
        if not left and self.loader is not None:
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

    async def drain(self, name: str, timeout: float) -> None:
        """No new requests for `name`; wait (at most `timeout`) for those in flight."""
        self.draining.add(name)
        deadline = time.monotonic() + timeout
        while self.in_flight.get(name, 0) > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    def undrain(self, name: str) -> None:
        self.draining.discard(name)

    # --- forwarding -------------------------------------------------------------

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                # Keep-alive upstream, but never more connections to a replica
                # than requests in flight there (≤ its `parallel` slots, see
                # `least_busy`): llama-server gives each open connection one
                # thread of a pool of parallel + 2 until its 5 s keep-alive
                # timeout, so more idle connections would stall new requests.
                # Idle ones are closed after 2 s, before the server's timeout.
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=2),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
                auto_decompress=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def forward(self, request: Request, body: bytes, model: str) -> Response:
        start = time.perf_counter()
        tried: set[str] = set()
        last_error = ""
        session = await self.session()
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
            headers = {"Content-Type": request.headers.get("content-type", "application/json")}
            if r.api_key:
                headers["Authorization"] = f"Bearer {r.api_key}"
            url = f"http://{r.host}:{r.port}{request.scope['path']}"  # not .url: that builds a URL
            try:
                upstream = await self._send(request, session, url, body, headers)
            except _ClientGone:
                self.release(r)  # the upstream request was cancelled with it
                return Response(status_code=499)
            except (aiohttp.ClientError, OSError) as exc:
                self.release(r)
                tried.add(r.name)
                last_error = f"{r.name}: {type(exc).__name__}"
                self.metrics.retry(model)
                continue
            if upstream.status >= 500 and len(tried) + 1 < len(
                candidates(model, self.healthy().values())
            ):
                upstream.release()
                self.release(r)
                tried.add(r.name)
                last_error = f"{r.name}: HTTP {upstream.status}"
                self.metrics.retry(model)
                continue
            headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
            if "text/event-stream" in upstream.headers.get("content-type", ""):
                return _Relay(self._relay(upstream, r, model, start), upstream.status, headers)
            # not streamed: read it whole (llama-server sends it in one piece), so
            # a failure while reading still reaches no client byte and is retried
            try:
                data = await upstream.read()
            except (aiohttp.ClientError, OSError) as exc:
                tried.add(r.name)
                last_error = f"{r.name}: {type(exc).__name__}"
                self.metrics.retry(model)
                continue
            finally:
                upstream.release()
                self.release(r)
            self.metrics.first_byte(model, time.perf_counter() - start)
            self.metrics.request(model, r.name, upstream.status, time.perf_counter() - start)
            return Response(data, status_code=upstream.status, headers=headers)

    @staticmethod
    async def _send(
        request: Request,
        session: aiohttp.ClientSession,
        url: str,
        body: bytes,
        headers: dict[str, str],
    ) -> aiohttp.ClientResponse:
        """The upstream request, abandoned (its connection closed, so llama-server
        stops generating) if the client disconnects before the answer starts."""
        async with _unless_client_leaves(request.receive):
            return await session.request(request.method, url, data=body, headers=headers)
        raise AssertionError("unreachable")  # for mypy: the block returns or raises

    async def _relay(
        self, upstream: aiohttp.ClientResponse, r: Replica, model: str, start: float
    ) -> AsyncGenerator[bytes, None]:
        """Chunks as they arrive; a client that leaves closes the upstream
        connection, which makes llama-server stop generating and free the slot."""
        first = True
        complete = False
        try:
            async for chunk in upstream.content.iter_any():
                if first:
                    self.metrics.first_byte(model, time.perf_counter() - start)
                    first = False
                yield chunk
            complete = True
        finally:
            if complete:
                upstream.release()
            else:
                upstream.close()
            self.release(r)
            self.metrics.request(model, r.name, upstream.status, time.perf_counter() - start)

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
            headers = {"Authorization": f"Bearer {r.api_key}"} if r.api_key else {}
            session = await self.session()
            url = f"http://{r.host}:{r.port}{path}"
            try:
                async with session.post(url, json=body, headers=headers) as upstream:
                    status = upstream.status
                    raw = await upstream.read()
            except (aiohttp.ClientError, OSError) as exc:
                raise RouterError(f"{r.name}: {type(exc).__name__}: {exc}") from None
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

    # --- the HTTP surface ------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        """POST /v1/chat/completions, /v1/completions, /v1/embeddings, /completion."""
        limit = self.settings.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return openai_error(413, f"Request bodies are limited to {limit} bytes.", "too_large")
        body = b""
        async for part in request.stream():
            body += part
            if len(body) > limit:
                return openai_error(
                    413, f"Request bodies are limited to {limit} bytes.", "too_large"
                )
        try:
            data = json.loads(body)
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
        if model is None and request.scope["path"] == "/completion":
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
        return await self.forward(request, body, model)
