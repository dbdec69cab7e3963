"""The router's HTTP/1.1 server: an asyncio protocol over httptools (llhttp,
the parser uvicorn uses), with no ASGI layer between the socket and the router.

Per request it parses the head, asks `Site.check` (Host, API key, body
size) before reading a body, reads the body, and writes what `Site.handle`
returns: a `Reply` in one `write`, or a `Stream` chunk by chunk. A client
that disconnects cancels its request's task, which closes the upstream
request (llama-server then stops generating). Keep-alive and pipelining as
HTTP/1.1 says; `Expect: 100-continue` is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Protocol

import httptools

__all__ = ["Request", "Reply", "Stream", "Site", "serve", "KEEP_ALIVE_S"]

log = logging.getLogger("llama_orch.router")

#: as nginx: longer than the common clients' own idle limits (httpx 5 s,
#: aiohttp 15 s), so a client never sends on a connection we just closed
KEEP_ALIVE_S = 75.0
MAX_HEAD_BYTES = 64 * 1024


@dataclass(slots=True)
class Request:
    method: str
    path: str
    #: lower-case names; a repeated header keeps its last value
    headers: dict[str, str]
    body: bytes = b""
    #: what followed `?` in the request target ("" when nothing did)
    query: str = ""

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
) -> bytes:
    """Status line and headers; `length` None: chunked."""
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = ""
    lines = [f"HTTP/1.1 {status} {reason}\r\n"]
    lines += [f"{k}: {v}\r\n" for k, v in headers]
    lines.append(
        f"content-length: {length}\r\n" if length is not None else "transfer-encoding: chunked\r\n"
    )
    if close:
        lines.append("connection: close\r\n")
    return "".join(lines).encode("latin-1") + raw_headers + b"\r\n"


def encode_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _Connection(asyncio.Protocol):
    """One client connection; requests on it are answered in order."""

    def __init__(self, site: Site, conns: set[_Connection]) -> None:
        self.site = site
        self.conns = conns
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.pending: deque[tuple[Request, bool]] = deque()
        self.task: asyncio.Task[None] | None = None
        self.last_active = self.loop.time()
        self._url = b""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._current = Request("", "", {})
        self._head_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._refused = False
        self._final: Reply | None = None  # a refusal waiting for earlier answers
        self._writable: asyncio.Future[None] | None = None

    # --- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.conns.add(self)

    def data_received(self, data: bytes) -> None:
        self.last_active = self.loop.time()
        if self._refused:
            return
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
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        self._writable = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    # --- llhttp callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._raw_headers = []
        self._head_bytes = 0
        self._body = []
        self._body_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise httptools.HttpParserError("request head too large")
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        path, _, query = self._url.partition(b"?")
        self._current = request = Request(
            self.parser.get_method().decode("latin-1"),
            path.decode("latin-1"),
            {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self._raw_headers},
            query=query.decode("latin-1"),
        )
        refusal = self.site.check(request)
        if refusal is not None:
            self._refuse(refusal)  # its body is not read: the connection closes
        elif request.headers.get("expect", "").lower() == "100-continue" and self.transport:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        self._body.append(body)
        self._body_bytes += len(body)
        if self._body_bytes > self.site.limit:  # sent chunked, without a length
            self._refuse(self.site.too_large())

    def on_message_complete(self) -> None:
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
                await self._stream(answer, keep_alive)
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

    async def _stream(self, answer: Stream, keep_alive: bool) -> None:
        chunks = answer.chunks
        try:
            self._write(
                encode_head(answer.status, answer.headers, None, not keep_alive, answer.raw_headers)
            )
            async for chunk in chunks:
                if chunk:
                    self._write(encode_chunk(chunk))
                    if self._writable is not None:
                        await self._writable  # the client reads slower than we get it
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

    def idle_for(self, now: float) -> float:
        return 0.0 if self.task is not None else now - self.last_active


async def serve(sock: socket.socket, site: Site) -> None:
    """Serves `site` on the listening socket until cancelled; then every
    client connection is closed (their requests are cancelled)."""
    loop = asyncio.get_running_loop()
    conns: set[_Connection] = set()
    server = await loop.create_server(lambda: _Connection(site, conns), sock=sock)
    try:
        while True:
            await asyncio.sleep(KEEP_ALIVE_S / 4)
            now = loop.time()
            for conn in [c for c in conns if c.idle_for(now) > KEEP_ALIVE_S]:
                conn.close()
    finally:
        server.close()
        for conn in list(conns):
            conn.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()
