"""The daemon's one HTTP client: HTTP/1.1 over pooled keep-alive
connections, parsed by httptools (llhttp, what uvicorn uses). The router
forwards through it to our llama-servers, external upstreams and peers'
routers; the daemon probes its servers, checks its upstreams and asks its
peers with it (`fetch`), and `ps --all-hosts` asks the peers with it too.

The hot path of every routed request. A general client (aiohttp, httpx)
builds URL objects, header multidicts, timers and tasks per request; this one
writes a request in one `write` and hands back the status, the headers and
the body as llhttp delivers them. `bench/router.py` measures it.

Keep-alive connections are reused newest first and closed after `idle_s`
(below llama-server's 5 s keep-alive: it holds one of its few HTTP threads
per open connection, so idle connections must not pile up there).
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections import deque
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httptools

__all__ = ["Pool", "Exchange", "PoolError", "origin"]

IDLE_S = 2.0
CONNECT_TIMEOUT_S = 5.0


def origin(url: str) -> tuple[str, int, bool]:
    """Where an http(s) URL points, as a pooled connection is keyed: (host,
    port, tls), the scheme's own port when the URL names none."""
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    return parts.hostname or "", parts.port or (443 if tls else 80), tls


class PoolError(ConnectionError):
    """The connection failed or the answer was not valid HTTP. `delivered`:
    the request had been written to the instance; `answered`: some of the
    answer had arrived."""

    def __init__(self, message: str, answered: bool = False) -> None:
        super().__init__(message)
        self.answered = answered
        self.delivered = answered  # the request was written to a connection


class Exchange(asyncio.Protocol):
    """One connection to an instance, and the request/answer on it now.

    After `send`: `await head()` gives the status and headers, then either
    `await body()` (all of it) or `async for chunk in chunks()` (as it
    arrives). `Pool.finish` returns the connection to the pool when the
    answer was read to its end, and closes it otherwise."""

    def __init__(self, key: tuple[str, int, bool]) -> None:
        self.key = key
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.reused = False
        self.idle_since = 0.0
        self._parts: deque[bytes] = deque()
        self._head: asyncio.Future[None] | None = None
        self._more: asyncio.Future[None] | None = None
        self._received = False  # any byte of this answer
        self._complete = False
        self._keep_alive = False
        self._error: PoolError | None = None

    # --- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(PoolError(f"invalid HTTP from the instance ({exc})", True))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self._complete:
            why = f"{type(exc).__name__}: {exc}" if exc else "the connection closed"
            self._fail(PoolError(why, self._received))

    # --- llhttp callbacks ------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self._head is not None and not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._parts.append(body)
        self._wake()

    def on_message_complete(self) -> None:
        self._complete = True
        self._keep_alive = self.parser.should_keep_alive()
        self._wake()

    # --- the exchange ----------------------------------------------------------------

    def send(self, request: bytes) -> None:
        assert self.transport is not None
        self.status, self.headers = 0, []
        self._parts.clear()
        self._received = self._complete = False
        self._error = None
        self._head = self.loop.create_future()
        self.transport.write(request)

    async def head(self) -> None:
        """Waits for the status line and headers (raises PoolError)."""
        assert self._head is not None
        await self._head  # done already: returns (or raises) at once

    async def body(self) -> bytes:
        """The rest of the answer, whole."""
        while not self._complete:
            await self._wait()
        return b"".join(self._parts)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The answer's body as it arrives (chunked encoding already undone)."""
        parts = self._parts
        while True:
            while parts:
                yield parts.popleft()
            if self._complete:
                return
            await self._wait()

    @property
    def reusable(self) -> bool:
        return self._complete and self._keep_alive and self.transport is not None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def _wait(self) -> asyncio.Future[None]:
        if self._error is not None:
            raise self._error
        self._more = self.loop.create_future()
        return self._more

    def _wake(self) -> None:
        more = self._more
        if more is not None and not more.done():
            more.set_result(None)

    def _fail(self, error: PoolError) -> None:
        self._error = error
        for waiter in (self._head, self._more):
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)
                waiter.exception()  # retrieved: nobody may be waiting on it


class Pool:
    """Keep-alive connections to the instances, per (host, port)."""

    def __init__(self, idle_s: float = IDLE_S) -> None:
        self.idle_s = idle_s
        self._idle: dict[tuple[str, int, bool], list[Exchange]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        #: the exchanges whose answer is being awaited or read, per (host, port, tls)
        self._busy: dict[tuple[str, int, bool], set[Exchange]] = {}

    async def open(
        self,
        host: str,
        port: int,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes,
        tls: bool = False,
    ) -> Exchange:
        """Sends a request; returns once its status and headers arrived.
        A pooled connection the instance closed meanwhile is replaced by a
        new one (nothing of the request was processed on it). `tls`: an
        https upstream (the system's certificate store checks it)."""
        key = (host, port, tls)
        head = [f"{method} {target} HTTP/1.1\r\nHost: {host}:{port}\r\n"]
        head += [f"{k}: {v}\r\n" for k, v in headers.items()]
        head.append(f"Content-Length: {len(body)}\r\n\r\n")
        request = "".join(head).encode("latin-1") + body
        stale = False
        while True:
            conn = self._pooled(key)
            try:
                if conn is None:
                    conn = await self._connect(key)
                self._busy.setdefault(key, set()).add(conn)
                conn.send(request)
                await conn.head()
                return conn
            except PoolError as exc:
                if conn is None:  # could not connect
                    exc.delivered = stale
                    raise
                self._done(conn)
                conn.close()
                if conn.reused and not exc.answered and not stale:
                    stale = True  # the instance closed it while idle: once more, anew
                    continue
                exc.delivered = True
                raise
            except BaseException:
                if conn is not None:
                    self._done(conn)
                    conn.close()  # cancelled: the instance stops working on it
                raise

    async def fetch(
        self,
        host: str,
        port: int,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes = b"",
        tls: bool = False,
    ) -> tuple[int, str]:
        """One request and its whole answer, (status, body as text), for the
        daemon's own asks: probes, upstream checks, peers. The caller bounds
        the time. Any failure is a PoolError; one to connect has what the
        system said as its cause (ConnectionRefusedError, ...)."""
        conn = await self.open(host, port, method, target, headers, body, tls)
        try:
            data = await conn.body()
        finally:
            self.finish(conn)  # closed unless read to its end
        return conn.status, data.decode("utf-8", errors="replace")

    async def fetch_url(
        self, url: str, method: str, headers: dict[str, str], body: bytes = b""
    ) -> tuple[int, str]:
        """`fetch` of an http(s) URL: its path and query are the target."""
        host, port, tls = origin(url)
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return await self.fetch(host, port, method, target, headers, body, tls)

    def _done(self, conn: Exchange) -> None:
        busy = self._busy.get(conn.key)
        if busy is not None:
            busy.discard(conn)
            if not busy:
                del self._busy[conn.key]

    def abort(self, host: str, port: int, tls: bool = False) -> int:
        """Drop every connection to (host, port) now: the requests on them
        fail as the link did (a peer that stopped answering); how many."""
        key = (host, port, tls)
        conns = [*self._busy.pop(key, ()), *self._idle.pop(key, [])]
        for conn in conns:
            if conn.transport is not None:
                conn.transport.abort()
        return len(conns)

    def finish(self, conn: Exchange) -> None:
        """Back to the pool when its answer was read whole, else closed."""
        self._done(conn)
        if not conn.reusable:
            conn.close()
            return
        loop = asyncio.get_running_loop()
        conn.reused = True
        conn.idle_since = loop.time()
        self._idle.setdefault(conn.key, []).append(conn)
        if self._sweeper is None:
            self._sweeper = loop.call_later(self.idle_s, self._sweep)

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def _pooled(self, key: tuple[str, int, bool]) -> Exchange | None:
        conns = self._idle.get(key)
        while conns:
            conn = conns.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def _connect(self, key: tuple[str, int, bool]) -> Exchange:
        loop = asyncio.get_running_loop()
        host, port, tls = key
        extra: dict[str, Any] = {"ssl": _tls_context(), "server_hostname": host} if tls else {}
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: Exchange(key), host, port, **extra),
                CONNECT_TIMEOUT_S,
            )
        except asyncio.TimeoutError:
            raise PoolError(f"connecting to {key[0]}:{key[1]} timed out") from None
        except OSError as exc:  # kept as the cause: `fetch` raises it as it is
            raise PoolError(f"{type(exc).__name__}: {exc.strerror or exc}") from exc
        return conn

    def _sweep(self) -> None:
        """Closes connections idle for `idle_s`; runs while any are pooled."""
        loop = asyncio.get_running_loop()
        cutoff = loop.time() - self.idle_s
        for key, conns in list(self._idle.items()):
            keep = [c for c in conns if c.idle_since > cutoff and c.transport is not None]
            for c in conns:
                if c not in keep:
                    c.close()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        self._sweeper = loop.call_later(self.idle_s / 2, self._sweep) if self._idle else None


@functools.lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    """Certificates checked against the system's store, as any client does."""
    return ssl.create_default_context()
