"""The router's HTTP/1.1 server: an asyncio protocol over httptools (llhttp,
the parser uvicorn uses), with no ASGI layer between the socket and the router.

Per request it parses the head, asks `Site.check` (Host, API key, body
size) before reading a body, reads the body, and writes what `Site.handle`
returns: a `Reply` in one `write`, or a `Stream` chunk by chunk. A client
that disconnects cancels its request's task, which closes the upstream
request (llama-server then stops generating). Keep-alive and pipelining as
HTTP/1.1 says; `Expect: 100-continue` is answered.

Hostile clients (as nginx meets them, `Limits`): a head must arrive whole
within `header_timeout` and within MAX_HEAD_BYTES, a body without a gap of
`body_timeout`; an answer is written as fast as the instance gives it (the
instance's slot is free when its answer is complete, whatever the client
reads) and a client that takes none of it for `send_timeout` is dropped. At
`max_connections` the connection stalled the longest gives way to a new one.
One sweeper task checks every connection's clock: no timer per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
from collections import deque
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Protocol

import httptools

__all__ = ["Request", "Reply", "Stream", "Site", "Limits", "serve", "KEEP_ALIVE_S"]

log = logging.getLogger("llama_orch.router")

#: as nginx: longer than the common clients' own idle limits (httpx 5 s,
#: aiohttp 15 s), so a client never sends on a connection we just closed
KEEP_ALIVE_S = 75.0
#: a request line and headers longer than this are refused (431); nginx's own
#: large_client_header_buffers hold 4 x 8 KB
MAX_HEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Limits:
    """What a client may take of the router (nginx's names in brackets)."""

    #: a request head must arrive whole within this (client_header_timeout)
    header_timeout: float = 60.0
    #: no gap longer than this between two parts of a body (client_body_timeout)
    body_timeout: float = 60.0
    #: a client that takes no byte of its answer for this long is dropped (send_timeout)
    send_timeout: float = 60.0
    #: an idle connection between requests is closed after this (keepalive_timeout)
    keepalive_timeout: float = KEEP_ALIVE_S
    #: client connections at once; at the cap the most stalled one gives way
    max_connections: int = 1024
    #: answer bytes waiting for a slow client before it is dropped
    max_buffered: int = 4 * 1024 * 1024


@dataclass(slots=True)
class Request:
    method: str
    path: str
    #: lower-case names; a repeated header keeps its last value
    headers: dict[str, str]
    body: bytes = b""
    #: what followed `?` in the request target ("" when nothing did)
    query: str = ""
    #: "1.0" or "1.1": an HTTP/1.0 client gets no chunked answer
    version: str = "1.1"

    @property
    def target(self) -> str:
        """The path and query, as a request line names them."""
        return f"{self.path}?{self.query}" if self.query else self.path


@dataclass(slots=True)
class Reply:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    #: more header lines, already encoded ("name: value\r\n"...): passed through
    raw_headers: bytes = b""


@dataclass(slots=True)
class Stream:
    """A body passed on as it comes; `chunks` is closed (aclose) whatever happens."""

    status: int
    chunks: AsyncIterator[bytes]
    headers: list[tuple[str, str]] = field(default_factory=list)
    raw_headers: bytes = b""


class Site(Protocol):
    #: the largest request body read; a longer one is answered `too_large()`
    limit: int

    def too_large(self) -> Reply: ...

    def check(self, request: Request) -> Reply | None:
        """On the head alone (no body yet): a refusal, or None to go on."""

    def handle(self, request: Request) -> Awaitable[Reply | Stream]:
        """The answer to a whole request."""


def encode_head(
    status: int,
    headers: list[tuple[str, str]],
    length: int | None,
    close: bool,
    raw_headers: bytes = b"",
    chunked: bool = True,
) -> bytes:
    """Status line and headers; `length` None: chunked, or (not `chunked`,
    for an HTTP/1.0 client) a body that the connection's close ends."""
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = ""
    lines = [f"HTTP/1.1 {status} {reason}\r\n"]
    lines += [f"{k}: {v}\r\n" for k, v in headers]
    if length is not None:
        lines.append(f"content-length: {length}\r\n")
    elif chunked:
        lines.append("transfer-encoding: chunked\r\n")
    if close:
        lines.append("connection: close\r\n")
    return "".join(lines).encode("latin-1") + raw_headers + b"\r\n"


def encode_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


#: connections in the order they came: ties of the loop's clock (uvloop counts
#: milliseconds, and dozens connect within one) go to the one that came first
_ARRIVAL = itertools.count()


class _Connection(asyncio.Protocol):
    """One client connection; requests on it are answered in order."""

    def __init__(self, site: Site, conns: set[_Connection], limits: Limits) -> None:
        self.site = site
        self.conns = conns
        self.limits = limits
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.pending: deque[tuple[Request, bool]] = deque()
        self.task: asyncio.Task[None] | None = None
        self.last_active = self.loop.time()
        self.arrival = next(_ARRIVAL)
        self._url = b""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._current = Request("", "", {})
        self._head_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._refused = False
        self._final: Reply | None = None  # a refusal waiting for earlier answers
        #: where the request being read is: None (between requests), "head", "body"
        self._reading: str | None = None
        self._head_started = self.last_active  # when its head began (or the connection)
        self._head_fed = 0  # bytes fed to the parser since the last head was complete
        self._hosts = 0  # Host headers in this head
        self._requests = 0  # requests read whole on this connection
        self._paused_since: float | None = None  # since when the client reads nothing

    # --- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        if len(self.conns) >= self.limits.max_connections:
            stalled = [c for c in self.conns if c.task is None and not c.pending]
            if not stalled:  # every one is being answered: this one waits its turn elsewhere
                self._refuse(Reply(503, b"Too many connections; try again shortly.\n"))
                return
            min(stalled, key=lambda c: (c.waiting_since(), c.arrival)).close()
        self.conns.add(self)

    def data_received(self, data: bytes) -> None:
        self.last_active = self.loop.time()
        while data and not self._refused:
            if self._reading == "body":  # a head is whole: the rest is the site's limit to keep
                self._feed(data)
                return
            room = MAX_HEAD_BYTES - self._head_fed
            if room <= 0:
                self._refuse(Reply(431, b"The request head is too large.\n"))
                return
            part, data = data[:room], data[room:]
            self._head_fed += len(part)
            self._feed(part)

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(Reply(400, b"Upgrades are not supported.\n"))
        except httptools.HttpParserError as exc:
            self._refuse(Reply(400, f"Malformed HTTP request ({exc}).\n".encode()))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.conns.discard(self)
        self.pending.clear()
        if self.task is not None:
            self.task.cancel()  # the client left: its upstream request goes too

    def pause_writing(self) -> None:
        self._paused_since = self.loop.time()

    def resume_writing(self) -> None:
        self._paused_since = None

    # --- llhttp callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._raw_headers = []
        self._head_bytes = 0
        self._body = []
        self._body_bytes = 0
        self._hosts = 0
        self._reading = "head"
        self._head_started = self.loop.time()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise httptools.HttpParserError("request head too large")
        self._hosts += name.lower() == b"host"
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        path, _, query = self._url.partition(b"?")
        self._reading, self._head_fed = "body", 0
        self._current = request = Request(
            self.parser.get_method().decode("latin-1"),
            path.decode("latin-1"),
            {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self._raw_headers},
            query=query.decode("latin-1"),
            version=self.parser.get_http_version(),
        )
        expect = request.headers.get("expect", "").lower()
        refusal = (
            Reply(400, b"A request has one Host header.\n")  # which one would the check trust?
            if self._hosts > 1
            else Reply(417, b"Only Expect: 100-continue is understood.\n")
            if expect and expect != "100-continue"
            else self.site.check(request)
        )
        if refusal is not None:
            self._refuse(refusal)  # its body is not read: the connection closes
        elif expect and self.transport:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        self._body.append(body)
        self._body_bytes += len(body)
        if self._body_bytes > self.site.limit:  # sent chunked, without a length
            self._refuse(self.site.too_large())

    def on_message_complete(self) -> None:
        self._reading = None
        self._requests += 1
        if self._refused:
            return
        request = self._current
        request.body = b"".join(self._body)
        self.pending.append((request, self.parser.should_keep_alive()))
        if self.task is None:
            self._next()
        elif len(self.pending) > 8 and self.transport is not None:
            self.transport.pause_reading()  # a client pipelining too far ahead

    # --- answering ----------------------------------------------------------------------

    def _next(self) -> None:
        request, keep_alive = self.pending.popleft()
        self.task = self.loop.create_task(self._answer(request, keep_alive))
        if self.transport is not None and not self.pending:
            self.transport.resume_reading()

    async def _answer(self, request: Request, keep_alive: bool) -> None:
        try:
            answer = await self.site.handle(request)
        except asyncio.CancelledError:
            return  # the connection is gone
        except Exception:
            log.exception(f"the router failed on {request.method} {request.path}")
            keep_alive = False
            answer = Reply(500, b"The router failed on this request; see the daemon's log.\n")
        try:
            if isinstance(answer, Stream):
                chunked = request.version != "1.0"  # 1.0 knows no chunks: the close ends it
                keep_alive = keep_alive and chunked
                await self._stream(answer, keep_alive, chunked)
            else:
                close = not keep_alive or (self._final is not None and not self.pending)
                head = encode_head(
                    answer.status, answer.headers, len(answer.body), close, answer.raw_headers
                )
                self._write(head if request.method == "HEAD" else head + answer.body)
        except asyncio.CancelledError:
            return
        except Exception:  # a stream that broke off: the client sees it end early
            log.exception(f"the router failed on {request.method} {request.path}")
            self.close()
            return
        self.task = None
        self.last_active = self.loop.time()
        if self.pending and keep_alive:
            self._next()
        elif self._final is not None:
            final, self._final = self._final, None
            self._refuse(final)
        elif not keep_alive:
            self.close()

    async def _stream(self, answer: Stream, keep_alive: bool, chunked: bool) -> None:
        """Chunks as they come, never waiting for the client: the instance's
        slot is free once its answer is complete; the sweeper drops a client
        that reads nothing for send_timeout (max_buffered bounds the wait)."""
        chunks = answer.chunks
        try:
            self._write(
                encode_head(
                    answer.status, answer.headers, None, not keep_alive, answer.raw_headers, chunked
                )
            )
            async for chunk in chunks:
                if chunk:
                    self._write(encode_chunk(chunk) if chunked else chunk)
                    if (
                        self.transport is not None
                        and self.transport.get_write_buffer_size() > self.limits.max_buffered
                    ):
                        self.transport.abort()  # far behind: its request is cancelled
            if chunked:
                self._write(b"0\r\n\r\n")
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def _refuse(self, reply: Reply) -> None:
        """Answer `reply` and close (after the answers in progress or queued)."""
        self._refused = True
        if self.task is not None or self.pending:
            self._final = reply
            return
        self._write(encode_head(reply.status, reply.headers, len(reply.body), True) + reply.body)
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def waiting_since(self) -> float:
        """Since when this connection has made no progress towards an answer."""
        return self._head_started if self._reading == "head" else self.last_active

    def overdue(self, now: float) -> bool:
        """Close it now (sweeper): a head, a body or a client that reads its
        answer too slowly, or idle too long between requests."""
        lim = self.limits
        if self._paused_since is not None and now - self._paused_since > lim.send_timeout:
            if self.transport is not None:
                self.transport.abort()  # what it did not take is dropped; its request cancelled
            return True
        if self.task is not None or self.pending or self._refused:
            return False
        if self._reading == "head" and now - self._head_started > lim.header_timeout:
            self._refuse(Reply(408, b"The request head did not arrive in time.\n"))
            return True
        if self._reading == "body" and now - self.last_active > lim.body_timeout:
            self._refuse(Reply(408, b"The request body stopped arriving.\n"))
            return True
        idle = lim.header_timeout if self._requests == 0 else lim.keepalive_timeout
        if self._reading is None and now - self.last_active > idle:
            self.close()
            return True
        return False


async def serve(
    socks: socket.socket | list[socket.socket], site: Site, limits: Limits | None = None
) -> None:
    """Serves `site` on the listening socket(s) until cancelled; then every
    client connection is closed (their requests are cancelled)."""
    limits = limits or Limits()
    loop = asyncio.get_running_loop()
    conns: set[_Connection] = set()
    servers = [
        await loop.create_server(lambda: _Connection(site, conns, limits), sock=sock)
        for sock in (socks if isinstance(socks, list) else [socks])
    ]
    shortest = min(
        limits.header_timeout, limits.body_timeout, limits.send_timeout, limits.keepalive_timeout
    )
    try:
        while True:
            await asyncio.sleep(min(1.0, shortest / 4))
            now = loop.time()
            for conn in list(conns):
                conn.overdue(now)
    finally:
        for server in servers:
            server.close()
        for conn in list(conns):
            # aborted, not closed: a close waits to write what a client that reads
            # nothing was sent (a stream it holds open), and the servers' close
            # waits for every connection: the daemon would never exit
            conn.abort()
        for server in servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
