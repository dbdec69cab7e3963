"""The router's wire, on real sockets: the HTTP/1.1 server (`wire.server`) with a
site made for the test, and the upstream client (`upstream`) against small
asyncio servers that answer, close or die as each test needs."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import httpx
import pytest

from llama_orchestrator.router.proxy import MAX_REPLAYS, may_retry
from llama_orchestrator.wire.pool import Pool, PoolError
from llama_orchestrator.wire.server import (
    Limits,
    Reply,
    Request,
    Stream,
    encode_chunk,
    encode_head,
    serve,
)

RUNNERS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {"asyncio": asyncio.run}
with contextlib.suppress(ImportError):  # the daemon runs uvloop where it exists
    import uvloop

    RUNNERS["uvloop"] = uvloop.run


def on_both_loops(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[str], None]:
    """An async test, run once on each event loop."""

    @pytest.mark.parametrize("loop", list(RUNNERS))
    def run(loop: str) -> None:
        RUNNERS[loop](test())

    run.__name__ = test.__name__
    return run


def test_encoding_a_head_and_chunks():
    head = encode_head(200, [("content-type", "text/plain")], 5, close=False)
    assert head == b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\n"
    head = encode_head(429, [], None, close=True)
    assert head == (
        b"HTTP/1.1 429 Too Many Requests\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    )
    assert encode_head(599, [], 0, close=False).startswith(b"HTTP/1.1 599 \r\n")
    assert encode_chunk(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"


@pytest.mark.parametrize(
    ("delivered", "answered", "replays", "expected"),
    [
        (False, False, 0, True),  # never reached the replica: always elsewhere
        (False, False, 5, True),
        (True, False, 0, True),  # the replica died on it: once more
        (True, False, MAX_REPLAYS, False),  # ...but not into every replica
        (True, True, 0, False),  # the answer began: never
    ],
)
def test_what_is_sent_again_elsewhere(delivered, answered, replays, expected):
    error = PoolError("x", answered=answered)
    error.delivered = delivered
    assert may_retry(error, replays) is expected


# --- the server --------------------------------------------------------------


class EchoSite:
    """Answers with what it got; `/slow` waits until cancelled; `/stream` streams."""

    limit = 100

    def __init__(self) -> None:
        self.seen: list[Request] = []
        self.cancelled = asyncio.Event()
        self.stream_closed = asyncio.Event()

    def too_large(self) -> Reply:
        return Reply(413, b"too large")

    def check(self, request: Request) -> Reply | None:
        if request.headers.get("authorization") == "no":
            return Reply(401, b"no")
        length = request.headers.get("content-length", "")
        return self.too_large() if length.isdigit() and int(length) > self.limit else None

    async def handle(self, request: Request) -> Reply | Stream:
        self.seen.append(request)
        if request.path == "/slow":
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if request.path == "/stream":
            return Stream(200, self._chunks(), [("content-type", "text/event-stream")])
        if request.path == "/boom":
            raise RuntimeError("a bug")
        return Reply(200, request.method.encode() + b" " + request.body, [("x-path", request.path)])

    async def _chunks(self) -> AsyncIterator[bytes]:
        try:
            for i in range(3):
                yield f"data: {i}\n\n".encode()
        finally:
            self.stream_closed.set()


async def serving(site) -> tuple[str, asyncio.Task[None]]:
    sock = socket.create_server(("127.0.0.1", 0))
    task = asyncio.create_task(serve(sock, site))
    await asyncio.sleep(0)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", task


async def raw(url: str, data: bytes, until: bytes = b"", timeout: float = 5) -> bytes:
    """Sends bytes, reads until `until` is seen or the server closes."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    got = b""
    try:
        while not (until and until in got):
            part = await asyncio.wait_for(reader.read(65536), timeout)
            if not part:
                break
            got += part
    finally:
        writer.close()
    return got


@on_both_loops
async def test_requests_keep_alive_and_answers_come_whole():
    site = EchoSite()
    url, task = await serving(site)
    try:
        async with httpx.AsyncClient(base_url=url) as client:
            for i in range(3):
                r = await client.post(f"/echo?q={i}", content=b"hello")
                assert r.status_code == 200 and r.text == "POST hello"
                assert r.headers["x-path"] == "/echo"  # the query is not part of the path
            assert (await client.get("/x")).text == "GET "
            r = await client.head("/x")
            assert r.status_code == 200 and r.content == b""
            assert r.headers["content-length"] == "5"  # the length of "HEAD ", not sent
        assert len(site.seen) == 5
        assert site.seen[0].headers["content-length"] == "5"
    finally:
        task.cancel()


@on_both_loops
async def test_pipelined_requests_are_answered_in_order_and_100_continue():
    site = EchoSite()
    url, task = await serving(site)
    try:
        two = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n1" * 2
        got = await raw(url, two + b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n", until=b"GET ")
        assert got.count(b"HTTP/1.1 200 OK") == 3 and got.index(b"POST 1") < got.index(b"GET ")
        got = await raw(
            url,
            b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n",
            until=b"100 Continue\r\n\r\n",
        )
        assert got == b"HTTP/1.1 100 Continue\r\n\r\n"
        got = await raw(url, b"GET /d HTTP/1.0\r\n\r\n")  # HTTP/1.0: closed after the answer
        assert got.startswith(b"HTTP/1.1 200 OK") and b"connection: close" in got
    finally:
        task.cancel()


@on_both_loops
async def test_at_the_cap_the_connections_that_came_first_give_way_first():
    """Twelve stalled heads at a cap of four: the first eight are closed
    without a word, in the order they came, though uvloop's clock (whole
    milliseconds, fixed for a turn of the loop) gives them one time."""
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    task = asyncio.create_task(serve(sock, EchoSite(), Limits(max_connections=4)))
    await asyncio.sleep(0)
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(12)]
    try:
        for _, writer in conns:
            writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
        for reader, _ in conns[:8]:
            assert await asyncio.wait_for(reader.read(100), 5) == b""
        for reader, _ in conns[8:]:  # the last four wait for the rest of their heads
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(reader.read(100), 0.2)
    finally:
        for _, writer in conns:
            writer.close()
        task.cancel()


@on_both_loops
async def test_refusals_on_the_head_bad_requests_and_a_failing_site():
    site = EchoSite()
    url, task = await serving(site)
    try:
        got = await raw(url, b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 413") and got.endswith(b"too large")  # body never read
        chunked = b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        got = await raw(url, chunked + b"c8\r\n" + b"x" * 200 + b"\r\n0\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 413")  # no length said, counted as it came
        got = await raw(url, b"GET /a HTTP/1.1\r\nHost: x\r\nAuthorization: no\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 401") and b"connection: close" in got
        assert (await raw(url, b"NOT HTTP AT ALL\r\n\r\n")).startswith(b"HTTP/1.1 400")
        huge = b"GET / HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n"
        assert (await raw(url, huge)).startswith(b"HTTP/1.1 431")
        async with httpx.AsyncClient(base_url=url) as client:
            r = await client.get("/boom")
            assert r.status_code == 500 and "daemon's log" in r.text
            assert (await client.get("/after")).status_code == 200  # still serving
        assert [r.path for r in site.seen] == ["/boom", "/after"]
    finally:
        task.cancel()


@on_both_loops
async def test_streams_are_chunked_and_a_client_that_leaves_cancels_its_request():
    site = EchoSite()
    url, task = await serving(site)
    try:
        async with httpx.AsyncClient(base_url=url) as client:
            r = await client.get("/stream")
            assert r.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
            assert r.headers["transfer-encoding"] == "chunked"
        assert site.stream_closed.is_set()
        with pytest.raises(asyncio.TimeoutError):
            await raw(url, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n", timeout=0.3)
        await asyncio.wait_for(site.cancelled.wait(), 5)  # the connection closed: cancelled
    finally:
        task.cancel()


@on_both_loops
async def test_stopping_the_server_closes_its_connections():
    site = EchoSite()
    url, task = await serving(site)
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.sleep(0.1)
    task.cancel()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, request cancelled
    await asyncio.wait_for(site.cancelled.wait(), 5)
    writer.close()


# --- the upstream client ---------------------------------------------------------


async def upstream_server(
    answer: Callable[[bytes, asyncio.StreamWriter], bytes | None],
) -> tuple[int, list[int], asyncio.Server]:
    """A server calling `answer(request_head, writer)` per request (None: close
    the connection without answering); returns its port and the number of
    requests seen per connection."""
    per_conn: list[int] = []

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        per_conn.append(0)
        me = len(per_conn) - 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.lower().split(b"\r\n")
                length = next((int(x[15:]) for x in lines if x.startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                per_conn[me] += 1
                out = answer(head, writer)
                if out is None:
                    writer.transport.abort()
                    return
                writer.write(out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    return server.sockets[0].getsockname()[1], per_conn, server


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@on_both_loops
async def test_connections_are_reused_and_chunked_answers_decoded():
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    port, per_conn, server = await upstream_server(
        lambda head, w: chunked if b"/chunked" in head else OK
    )
    up = Pool()
    try:
        for _ in range(3):
            ex = await up.open("127.0.0.1", port, "POST", "/x", {"A": "b"}, b"{}")
            assert ex.status == 200 and await ex.body() == b"ok"
            up.finish(ex)
        ex = await up.open("127.0.0.1", port, "GET", "/chunked", {}, b"")
        assert [c async for c in ex.chunks()] == [b"abc", b"de"]
        up.finish(ex)
        assert per_conn == [4]  # one connection for all
    finally:
        up.close()
        server.close()


@on_both_loops
async def test_an_unfinished_answer_closes_its_connection():
    port, per_conn, server = await upstream_server(lambda head, w: OK)
    up = Pool()
    try:
        ex = await up.open("127.0.0.1", port, "GET", "/", {}, b"")
        up.finish(ex)  # body not read... but it had arrived whole with the head
        ex = await up.open("127.0.0.1", port, "GET", "/", {}, b"")
        ex.close()  # the caller gave up on it
        up.finish(ex)
        ex = await up.open("127.0.0.1", port, "GET", "/", {}, b"")
        up.finish(ex)
        assert per_conn == [2, 1]
    finally:
        up.close()
        server.close()


@on_both_loops
async def test_a_stale_keep_alive_connection_is_replaced_but_a_death_is_reported():
    answers = iter([OK, None, OK, None])
    port, per_conn, server = await upstream_server(lambda head, w: next(answers))
    up = Pool()
    try:
        ex = await up.open("127.0.0.1", port, "GET", "/", {}, b"")
        up.finish(ex)
        # the pooled connection dies without answering: sent again on a new one
        ex = await up.open("127.0.0.1", port, "GET", "/", {}, b"")
        assert ex.status == 200
        ex.close()
        up.finish(ex)
        # a new connection that dies on the request: the caller learns it was delivered
        with pytest.raises(PoolError) as info:
            await up.open("127.0.0.1", port, "GET", "/", {}, b"")
        assert info.value.delivered and not info.value.answered
    finally:
        up.close()
        server.close()
    with pytest.raises(PoolError) as info:  # nobody listens: never delivered
        await up.open("127.0.0.1", port, "GET", "/", {}, b"")
    assert not info.value.delivered


@on_both_loops
async def test_a_death_mid_answer_and_idle_connections_closed():
    half = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"

    def answer(head: bytes, writer: asyncio.StreamWriter) -> bytes | None:
        if b"/half" in head:
            writer.write(half)
            return None
        return OK

    port, per_conn, server = await upstream_server(answer)
    up = Pool(idle_s=0.2)
    try:
        ex = await up.open("127.0.0.1", port, "GET", "/half", {}, b"")
        with pytest.raises(PoolError) as info:
            await ex.body()
        assert info.value.answered
        up.finish(ex)
        ex = await up.open("127.0.0.1", port, "GET", "/", {}, b"")
        up.finish(ex)
        await asyncio.sleep(0.6)  # past idle_s: the pool closed it
        ex = await up.open("127.0.0.1", port, "GET", "/", {}, b"")
        up.finish(ex)
        assert per_conn == [1, 1, 1]
    finally:
        up.close()
        server.close()


class _Backlog:
    """A site whose answer is a stream of 16 MB that then waits for ever."""

    limit = 1 << 20

    def too_large(self) -> Reply:
        return Reply(413)

    def check(self, request: Request) -> Reply | None:
        return None

    async def handle(self, request: Request) -> Stream:
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(256):
                yield b"x" * 65536
            await asyncio.Event().wait()

        return Stream(200, chunks())


@on_both_loops
async def test_the_server_ends_while_a_client_holds_an_answer_it_never_reads():
    """A daemon that stops must not wait for a client that reads nothing: a
    closed connection waits to write what it holds, and the server's close
    waited for every connection (the daemon hung in its exit)."""
    loop = asyncio.get_running_loop()
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    task = asyncio.create_task(serve(sock, _Backlog(), Limits(max_buffered=1 << 30)))
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    await loop.sock_connect(client, ("127.0.0.1", port))
    await loop.sock_sendall(client, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await asyncio.sleep(0.5)  # the answer backs up behind a client that reads none of it
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=30)
    client.close()
    assert task in done, "the server did not end while a client held an unread answer"
