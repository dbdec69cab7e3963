"""The router: one OpenAI-compatible endpoint in front of the healthy
instances (DESIGN §6). Choosing is `balance`'s; this module keeps the slot
counts and queues in `slots`, and forwards
(over `wire.pool`, answering through `wire.server`).

What is retried (`may_retry`): a replica that could not be reached, or that
answered 5xx while another can take the request, is skipped transparently.
A replica that took the request and died before any byte of an answer (a
`kill -9`, a crash) is replaced once: a request that crashes servers is not
replayed into every replica. Nothing is retried once the answer began.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from llama_orchestrator.config.settings import RouterSettings
from llama_orchestrator.router.balance import (
    Replica,
    candidates,
    lightest,
    model_id,
    model_names,
)
from llama_orchestrator.router.external import Externals
from llama_orchestrator.router.listing import ModelList
from llama_orchestrator.router.peers import HOP_HEADER
from llama_orchestrator.router.routes import presented_key
from llama_orchestrator.router.slots import Refusal, Slots
from llama_orchestrator.upstreams import KeyMissing, Usage, UsageMeter, for_upstream
from llama_orchestrator.wire.pool import Exchange, Pool, PoolError
from llama_orchestrator.wire.server import Reply, Request, Stream

__all__ = [
    "Router",
    "RouterMetrics",
    "RouterError",
    "openai_error",
    "may_retry",
    "pass_on",
    "JSON_HEADER",
    "MAX_REPLAYS",
    "Completion",
]

RETRY_AFTER = "1"
#: how many times a request whose replica died while working on it is sent again
MAX_REPLAYS = 1
#: not passed on: they describe our connection to the instance (the length
#: and framing of the client's answer are the server's)
_HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length"}
#: nor is an instance's CORS policy (llama-server's own is permissive): the
#: router sends its own, for `router.allowed_origins` only (`routes.cors_headers`)
_CORS = b"access-control-"
#: as llama-server labels its JSON
JSON_HEADER = _JSON = ("content-type", "application/json; charset=utf-8")


def openai_error(
    status: int,
    message: str,
    kind: str,
    retry_after: float | None = None,
    retry: bool = True,
    **extra: Any,
) -> Reply:
    """An error in llama-server's (and OpenAI's) shape; a 429 or 503 invites
    the client to try again (Retry-After) unless `retry` is False."""
    wait = str(math.ceil(retry_after)) if retry_after else RETRY_AFTER
    headers = [_JSON, ("retry-after", wait)] if status in (429, 503) and retry else [_JSON]
    body = {"error": {"message": message, "type": kind, "code": status, **extra}}
    return Reply(status, json.dumps(body).encode(), headers)


def pass_on(headers: list[tuple[bytes, bytes]]) -> tuple[bytes, bool]:
    """An instance's answer headers as the client gets them (encoded, less the
    hop-by-hop ones), and whether the answer is an event stream."""
    lines = []
    streamed = False
    for name, value in headers:
        lower = name.lower()
        if lower in _HOP_BY_HOP or lower.startswith(_CORS):
            continue
        if lower == b"content-type" and b"event-stream" in value:
            streamed = True
        lines.append(b"%s: %s\r\n" % (name, value))
    return b"".join(lines), streamed


#: a client's request headers not passed on to an instance: those of its
#: connection to us, and its key for the router (the instance gets its own)
_NOT_FORWARDED = frozenset(
    {
        "host",
        "connection",
        "keep-alive",
        "content-length",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "proxy-authorization",
        "proxy-connection",
        "authorization",
        "x-api-key",
        "content-type",
    }
)


def _headers_for(
    r: Replica, content_type: str, key: str | None = None, client: dict[str, str] | None = None
) -> dict[str, str]:
    """What a request to `r` carries besides its body: the client's own
    headers when `r` is an instance of ours (llama-server reads some:
    conversation ids, its CORS proxy's), and the instance's key."""
    headers = {k: v for k, v in client.items() if k not in _NOT_FORWARDED} if client else {}
    headers["Content-Type"] = content_type
    if key or r.api_key:
        headers["Authorization"] = f"Bearer {key or r.api_key}"
    if r.peer is not None:
        headers[HOP_HEADER] = "1"  # the peer serves it itself: one hop at most
    return headers


#: what an upstream answers a key it does not take with
KEY_REFUSED = (401, 403)


def error_message(body: bytes) -> str:
    """The `error.message` of an OpenAI-style error body ('' when it has none)."""
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    error = data.get("error") if isinstance(data, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return message[:200] if isinstance(message, str) else ""


def upstream_target(r: Replica, target: str) -> str:
    """A request's path as an upstream gets it: its URL's path, then the
    route after /v1 (`/v1/chat/completions` to https://x/api/v1 is
    /api/v1/chat/completions)."""
    rest = target[3:] if target.startswith("/v1/") or target == "/v1" else target
    return r.base + rest


@dataclass(frozen=True)
class Completion:
    """A plan's request answered: by which instance, its JSON, the tier
    ("local", or "external": an upstream) and what it cost."""

    instance: str
    data: dict[str, Any]
    tier: str = "local"
    cost: float | None = None


def may_retry(error: PoolError, replays: int) -> bool:
    """Whether a request that failed on a replica goes to another one:
    never once the answer began; once (MAX_REPLAYS) when the replica took it
    and died; always when it was never delivered."""
    if error.answered:
        return False
    return not error.delivered or replays < MAX_REPLAYS


#: the name the router's tests know it by
_Refusal = Refusal


def _refused(refusal: Refusal) -> Reply:
    return openai_error(refusal.status, refusal.message, refusal.kind, retry=refusal.retry)


class RouterError(Exception):
    """A request the router made for the daemon itself (a plan's task) failed.
    `final`: the instance refused the request itself (4xx): sending it again
    cannot help. `busy`: it was never sent (no healthy instance, or no slot
    in time): not the request's fault, try again later."""

    def __init__(self, message: str, final: bool = False, busy: bool = False) -> None:
        super().__init__(message)
        self.final = final
        self.busy = busy


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
    #: the instances that take requests now (the daemon's board); read through `slots`,
    #: which are made from it when none are given
    healthy: Callable[[], dict[str, Replica]]
    #: every model name a config offers (aliases, tags:...), healthy or not
    known: Callable[[], set[str]]
    metrics: RouterMetrics = field(default_factory=RouterMetrics)
    loader: Loader | None = None
    #: in-flight counts and queues (shared with on-demand); made here when not given
    slots: Slots | None = None
    pool: Pool = field(default_factory=Pool)
    #: when it started: the `created` of a model no instance has told us about
    started: float = field(default_factory=time.time)
    #: the external upstreams' keys, limits and spending (the daemon keeps them current)
    externals: Externals = field(default_factory=Externals)
    #: why nothing will serve `model` until someone starts it (every instance of
    #: it stopped or failed): a sentence saying how; None while one is coming
    stopped: Callable[[str], str | None] = lambda model: None

    def __post_init__(self) -> None:
        self.listing = ModelList(self._get, self.started)
        if self.slots is None:
            self.slots = Slots(self.settings, lambda: self.healthy().values())
        self._slots: Slots = self.slots

    # --- slots and queues (see router.slots) -------------------------------------

    @property
    def in_flight(self) -> dict[str, int]:
        return self._slots.in_flight

    @property
    def last_used(self) -> dict[str, float]:
        return self._slots.last_used

    def replicas(self) -> list[Replica]:
        return list(self._slots.replicas())

    def models(self) -> list[str]:
        """What /v1/models lists: healthy aliases and those loaded on demand."""
        lazy = self.loader.models() if self.loader is not None else set()
        return sorted(set(model_names(self.replicas())) | {model_id(a) for a in lazy})

    def queue_depth(self, cls: str | None = None) -> int:
        return self._slots.queue_depth(cls)

    def waiting(self, model: str, cls: str) -> int:
        return self._slots.waiting(model, cls)

    def release(self, r: Replica) -> None:
        if not self._slots.release(r) and self.loader is not None:
            self.loader.idle(r.name)

    def waiting_models(self) -> list[str]:
        return self._slots.waiting_models()

    def refuse_waiting(self, models: set[str], message: str) -> None:
        self._slots.refuse_waiting(models, message)

    def wake(self) -> None:
        self._slots.wake()

    async def acquire(
        self, model: str, exclude: frozenset[str], batch: bool = False, priority: int = 0
    ) -> Replica:
        """A slot on the least busy replica (see `Slots.acquire`); when nothing
        serves `model`, the loader may start an on-demand instance for it."""
        loading = None
        if not candidates(model, self.replicas()):
            if self.loader is not None:
                loading = self.loader.wake(model)
            if loading is None and (why := self.stopped(model)) is not None:
                # not coming back by itself: a retry would only be refused again
                raise Refusal(503, why, "unavailable_error", retry=False)
        return await self._slots.acquire(model, exclude, loading, batch, priority)

    def is_batch(self, request: Request) -> bool:
        """A request of the batch class: `X-Priority: batch`, or a key of
        `router.batch_api_keys` (interactive ones go first; see `router.slots`)."""
        headers = request.headers
        if headers.get("x-priority", "").strip().lower() == "batch":
            return True
        given = presented_key(headers)
        return any(secrets.compare_digest(given, k) for k in self.settings.batch_api_keys)

    # --- forwarding -------------------------------------------------------------

    async def close(self) -> None:
        self.pool.close()

    async def forward(self, request: Request, model: str) -> Reply | Stream:
        """Sends the request to the least busy replica serving `model`
        (retrying as `may_retry` allows). Cancelling it (the client left)
        closes the upstream connection, which frees the llama-server slot."""
        start = time.perf_counter()
        tried: set[str] = set()
        replays = 0
        last_error = ""
        batch = self.is_batch(request)
        skip, limited = self._blocked(model)  # upstreams at their rate or budget
        if limited is not None:
            return self._limited(model, *limited)
        if HOP_HEADER in request.headers:  # a peer's: served here, never sent on
            skip |= {c.name for c in candidates(model, self.replicas()) if c.peer is not None}
        while True:
            try:
                r = await self.acquire(model, frozenset(tried | skip), batch)
            except Refusal as refusal:
                if tried:  # every replica failed before answering
                    return openai_error(
                        503,
                        f"Every instance serving '{model}' failed this request ({last_error}).",
                        "unavailable_error",
                    )
                self.metrics.request(model, "", refusal.status, 0.0)
                return _refused(refusal)
            if r.remote is not None and (late := self._take_upstream(r, model)) is not None:
                if isinstance(late, tuple):
                    return self._limited(model, *late)
                skip.add(r.name)  # its limit was reached while this request waited
                continue
            try:
                answer = await self._send(r, request)
            except PoolError as exc:
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
            if r.remote is not None and answer.status in KEY_REFUSED:
                # its own 401 would tell the client that the client's key is wrong
                refused = await self._refused(answer, r, model, start)
                tried.add(r.name)
                last_error = f"{r.name}: refused the key"
                if len(tried) < len(candidates(model, self.replicas())):
                    continue
                return refused
            if answer.status >= 500 and len(tried) + 1 < len(candidates(model, self.replicas())):
                answer.close()
                self.release(r)
                tried.add(r.name)
                last_error = f"{r.name}: HTTP {answer.status}"
                self.metrics.retry(model)
                continue
            return await self._answer(answer, r, model, start)

    def _blocked(self, model: str) -> tuple[set[str], tuple[float, str] | None]:
        """The upstreams serving `model` that may take no request now (their
        rate or budget), and (seconds to wait, why) when that is all of them."""
        cands = candidates(model, self.replicas())
        why = {c.name: b for c in cands if c.remote and (b := self.externals.blocked(c.name))}
        return set(why), (min(why.values()) if cands and len(why) == len(cands) else None)

    def _take_upstream(self, r: Replica, model: str) -> tuple[float, str] | bool | None:
        """A request goes to upstream `r` now: counted against its rate (None).
        If its limit was reached while the request waited: released, and True
        when another replica serves `model`, else (seconds to wait, why)."""
        blocked = self.externals.blocked(r.name)
        if blocked is None:
            self.externals.take(r.name)
            return None
        self.release(r)
        if any(c.name != r.name for c in candidates(model, self.replicas())):
            return True
        return blocked

    async def _refused(self, answer: Exchange, r: Replica, model: str, start: float) -> Reply:
        """An upstream's 401/403 to a request: its body read (for its words),
        the upstream reported, and the 502 the client gets instead."""
        try:
            body = await answer.body()
        except PoolError:
            body = b""
        finally:
            self.pool.finish(answer)
            self.release(r)
        message = self.externals.refused(r.name, answer.status, error_message(body))
        self.metrics.request(model, r.name, 502, time.perf_counter() - start)
        return openai_error(502, message, "server_error")

    def _limited(self, model: str, wait: float, why: str) -> Reply:
        self.metrics.request(model, "", 429, 0.0)
        return openai_error(
            429, f"{why}; try again in {math.ceil(wait)}s.", "rate_limit_error", wait
        )

    async def _send(self, r: Replica, request: Request) -> Exchange:
        """The client's request, as it came, to `r` (with `r`'s own key); to
        an upstream with its key, its path and its model name."""
        content_type = request.headers.get("content-type", "application/json")
        target, body, key = request.target, request.body, None
        if r.remote is not None:
            try:
                key = self.externals.key(r.name)
            except KeyMissing as exc:
                raise PoolError(exc.message) from None
            target = upstream_target(r, target)
            body, _ = for_upstream(body, r.remote)
        return await self.pool.open(
            r.host,
            r.port,
            request.method,
            target,
            _headers_for(r, content_type, key, request.headers if r.remote is None else None),
            body,
            tls=r.tls,
        )

    async def _fetch(self, r: Replica, request: Request) -> tuple[int, Any, bytes]:
        """`request` to `r`, its answer read whole: (status, headers, body).
        Raises PoolError."""
        answer = await self._send(r, request)
        try:
            return answer.status, answer.headers, await answer.body()
        finally:
            self.pool.finish(answer)

    async def _answer(
        self, answer: Exchange, r: Replica, model: str, start: float, held: bool = True
    ) -> Reply | Stream:
        """`answer` passed on to the client: whole, or as a stream. `held`:
        the request holds a slot of `r` (released at the end) and its first
        byte is measured; False for one that takes none (`send_to`)."""
        raw, streamed = pass_on(answer.headers)
        if streamed:
            chunks = self._relay(answer, r, model, start, held)
            return Stream(answer.status, chunks, raw_headers=raw)
        try:
            body = await answer.body()
        except PoolError as exc:
            return self._broken(model, r, exc, start)
        finally:
            self.pool.finish(answer)
            if held:
                self.release(r)
        if r.remote is not None:
            if answer.status < 400:
                self.externals.accepted(r.name)
            meter = UsageMeter(False)
            meter.feed(body)
            self._count(r, meter.done())
        elapsed = time.perf_counter() - start
        if held:
            self.metrics.first_byte(model, elapsed)
        self.metrics.request(model, r.name, answer.status, elapsed)
        return Reply(answer.status, body, raw_headers=raw)

    def _broken(self, model: str, r: Replica, exc: PoolError, start: float) -> Reply:
        self.metrics.request(model, r.name, 502, time.perf_counter() - start)
        return openai_error(
            502, f"The instance '{r.name}' failed while answering ({exc}).", "server_error"
        )

    async def _relay(
        self, answer: Exchange, r: Replica, model: str, start: float, held: bool = True
    ) -> AsyncIterator[bytes]:
        """Chunks as they arrive; a client that leaves closes the upstream
        connection, which makes llama-server stop generating and free the slot."""
        first = held  # only a slot's request has its first byte measured
        meter = UsageMeter(True) if r.remote is not None else None
        try:
            async for chunk in answer.chunks():
                if first:
                    self.metrics.first_byte(model, time.perf_counter() - start)
                    first = False
                if meter is not None:
                    meter.feed(chunk)
                yield chunk
        finally:
            self.pool.finish(answer)  # closed unless read to its end
            if held:
                self.release(r)
            if meter is not None:
                self._count(r, meter.done())
            self.metrics.request(model, r.name, answer.status, time.perf_counter() - start)

    def _count(
        self, r: Replica, usage: Usage | None, run_id: str | None = None, task_id: str | None = None
    ) -> float | None:
        """What an upstream's answer cost (None: it said no `usage`)."""
        if usage is None:
            return None
        return self.externals.record(r.name, usage, run_id, task_id)

    async def complete(
        self,
        model: str,
        body: dict[str, Any],
        path: str = "/v1/chat/completions",
        priority: int = 5,
        origin: tuple[str, str] | None = None,
    ) -> Completion:
        """One request on behalf of the daemon (a plan's llm task: `origin`
        is its run and task), balanced and queued as batch work of
        `priority`. Raises RouterError (busy: an upstream at its limit too).
        Cancelling it closes the upstream connection."""
        skip, limited = self._blocked(model)
        while limited is None:
            try:
                r = await self.acquire(model, frozenset(skip), batch=True, priority=priority)
            except Refusal as refusal:
                raise RouterError(refusal.message, busy=True) from None
            late = self._take_upstream(r, model) if r.remote is not None else None
            if late is None:
                break
            if isinstance(late, tuple):
                limited = late
            skip.add(r.name)
        if limited is not None:  # not the task's fault: it waits, as for a busy slot
            wait, why = limited
            raise RouterError(f"{why}; try again in {math.ceil(wait)}s.", busy=True)
        start = time.perf_counter()
        status = 0
        try:
            try:
                status, _, raw = await self._fetch(r, _own_request("POST", path, json.dumps(body)))
            except PoolError as exc:
                raise RouterError(f"{r.name}: {exc}") from None
            try:
                data = json.loads(raw)
            except ValueError:
                data = None
            if r.remote is not None and status in KEY_REFUSED:
                # not the task's fault: it waits for the upstream, as for a busy slot
                message = self.externals.refused(r.name, status, error_message(raw))
                raise RouterError(message, busy=True)
            if status >= 400 or not isinstance(data, dict):
                detail = error_message(raw) or raw[-300:].decode("utf-8", "replace")
                final = 400 <= status < 500 and status not in (408, 429)
                raise RouterError(f"{r.name} answered HTTP {status}: {detail}", final)
            if r.remote is None:
                return Completion(r.name, data)
            self.externals.accepted(r.name)
            meter = UsageMeter(False)
            meter.feed(raw)
            spent = self._count(r, meter.done(), *(origin or (None, None)))
            return Completion(r.name, data, "external", spent)
        finally:
            self.release(r)
            self.metrics.request(model, r.name, status or 499, time.perf_counter() - start)

    # --- the proxied routes ----------------------------------------------------

    async def handle_light(self, request: Request, model: str) -> Reply | Stream:
        """A request that takes no slot (/tokenize, /props, /slots, the web
        UI's pages ...): to the least loaded instance of `model` on this
        machine, without waiting for a slot: llama-server answers them at
        once. With none healthy it is queued as any request (an on-demand start)."""
        ours = [
            c for c in candidates(model, self.replicas()) if c.remote is None and c.peer is None
        ]
        r = lightest(ours, self.in_flight)
        if r is None:
            return await self.forward(request, model)
        return await self.send_to(r, request, model)

    def local(self, name: str | None = None) -> list[Replica]:
        """The healthy instances of this machine (only `name`, when given)."""
        return [
            r
            for r in self.replicas()
            if r.remote is None and r.peer is None and (name is None or r.name == name)
        ]

    async def send_to(
        self, r: Replica, request: Request, model: str | None = None
    ) -> Reply | Stream:
        """`request` to instance `r` itself, unbalanced: no slot is taken (a
        light request, or one addressed with `?instance=`). A streamed answer
        is passed on as it comes."""
        start = time.perf_counter()
        label = model or r.alias
        try:
            answer = await self._send(r, request)
        except PoolError as exc:
            return self._broken(label, r, exc, start)
        return await self._answer(answer, r, label, start, held=False)

    async def model_list(self) -> list[dict[str, Any]]:
        """/v1/models (see `router.listing`)."""
        return await self.listing.entries(self.models(), self.replicas())

    async def _get(self, r: Replica, path: str) -> bytes:
        """GET `path` of `r`, the answer's body."""
        return (await self._fetch(r, _own_request("GET", path)))[2]


def _own_request(method: str, target: str, body: str = "") -> Request:
    """A request the router makes itself (a plan's task, a look at /v1/models)."""
    return Request(method, target, {"content-type": "application/json"}, body.encode())
