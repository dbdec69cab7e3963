import pytest

from llama_orchestrator.engine import health
from llama_orchestrator.engine.status import observed_state
from llama_orchestrator.errors import UserError
from llama_orchestrator.states import InstanceState as S
from llama_orchestrator.timefmt import human_duration, parse_since
from llama_orchestrator.wire.pool import Pool


@pytest.mark.parametrize(
    ("status", "refused", "expected"),
    [
        (200, False, "healthy"),
        (503, False, "loading"),
        (500, False, "error"),
        (None, True, "down"),
        (None, False, "error"),
    ],
)
def test_classify(status, refused, expected):
    assert health.classify(status, refused) == expected


def test_probe_uses_the_given_getter_and_loopback_for_wildcards():
    seen = []

    def get(host, port, path, timeout):
        seen.append((host, port, path, timeout))
        return 503, '{"error":"Loading model"}'

    r = health.probe("0.0.0.0", 8001, 1.5, get)
    assert seen == [("127.0.0.1", 8001, "/health", 1.5)]
    assert r.status == "loading" and r.http_status == 503 and not r.ok
    assert health.probe("::", 8001, 1, get) and seen[-1][0] == "::1"


@pytest.mark.parametrize(
    ("exc", "status", "text"),
    [
        (ConnectionRefusedError(111, "refused"), "down", "connection refused"),
        (TimeoutError(), "error", "no answer within 0.1s"),
        (ConnectionResetError(104, "reset"), "error", "ConnectionResetError"),
    ],
)
def test_probe_failures(exc, status, text):
    def get(host, port, path, timeout):
        raise exc

    r = health.probe("127.0.0.1", 1, 0.1, get)
    assert r.status == status and text in (r.error or "")


def test_http_get_against_a_real_socket_server():
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"status":"ok"}')

        def log_message(self, *a):
            pass

    srv = HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.handle_request).start()
    r = health.probe("127.0.0.1", srv.server_address[1], 2)
    srv.server_close()
    assert r.ok and r.http_status == 200
    assert health.probe("127.0.0.1", srv.server_address[1], 0.5).status == "down"


@pytest.mark.parametrize(
    ("current", "status", "expected"),
    [
        (S.STARTING, "healthy", S.HEALTHY),
        (S.STARTING, "loading", S.STARTING),
        (S.STARTING, "down", S.STARTING),
        (S.STARTING, "error", S.UNHEALTHY),
        (S.HEALTHY, "loading", S.UNHEALTHY),
        (S.UNHEALTHY, "healthy", S.HEALTHY),
    ],
)
def test_observed_state_from_one_probe(current, status, expected):
    p = health.ProbeResult(status, 200 if status == "healthy" else None, 1.0)
    assert observed_state(current, p) == expected


def test_parse_since():
    assert parse_since("10m", 1000.0) == 400.0
    assert parse_since("1h30m", 10000.0) == 10000.0 - 5400
    assert parse_since("2026-11-22T06:00:00+00:00", 0) == 1795327200.0
    with pytest.raises(UserError, match="neither a duration nor a time"):
        parse_since("yesterday", 0)


def test_human_duration():
    assert [human_duration(s) for s in (None, 5, 130, 3720, 90000)] == [
        "-",
        "5s",
        "2m10s",
        "1h02m",
        "1d1h",
    ]


def test_http_get_rejects_something_that_is_not_http():
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def answer():
        conn, _ = srv.accept()
        conn.recv(1024)
        conn.sendall(b"SSH-2.0-OpenSSH\r\n")
        conn.close()

    threading.Thread(target=answer).start()
    r = health.probe("127.0.0.1", srv.getsockname()[1], 2)
    srv.close()
    assert r.status == "error" and "not an HTTP response" in (r.error or "")


def test_a_probe_we_cannot_make_is_local_and_no_step_counts_it():
    import errno

    from llama_orchestrator.config.instance import HealthcheckSection
    from llama_orchestrator.engine import health
    from llama_orchestrator.engine.step import Watch, step
    from llama_orchestrator.states import Desired
    from llama_orchestrator.states import InstanceState as S

    for code in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
        r = health._failed(OSError(code, "short"), 0.0, 1.0)
        assert r.status == health.LOCAL and not r.ok
    assert health._failed(OSError(errno.ECONNRESET, "reset"), 0.0, 1.0).status == health.ERROR
    hc = HealthcheckSection(retries=1)
    watch = Watch(since=0.0, failures=0)
    local = health.ProbeResult(health.LOCAL, None, 1.0, "the probe could not be made here")
    s = step(S.HEALTHY, Desired.RUNNING, 0.0, watch, local, hc, "on-failure", 100.0)
    assert (s.state, s.watch, s.restart) == (S.HEALTHY, watch, False)
    failed = health.ProbeResult(health.ERROR, 500, 1.0, "boom")
    assert step(S.HEALTHY, Desired.RUNNING, 0.0, watch, failed, hc, "on-failure", 100.0).restart


async def test_a_probe_timed_out_by_our_own_busy_loop_is_no_verdict():
    """Issue 24.1: a loop blocked (by one huge request, say) woke the probe
    late, and the instance was restarted for our fault."""
    import asyncio
    import socket
    import threading
    import time

    from llama_orchestrator.engine import health

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]

        def answer_late() -> None:  # answers after the probe's timeout
            conn, _ = srv.accept()
            with conn:
                conn.recv(4096)
                time.sleep(0.4)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

        t = threading.Thread(target=answer_late)
        t.start()
        pool = Pool()
        probe = asyncio.ensure_future(health.aprobe("127.0.0.1", port, 0.2, pool.fetch))
        await asyncio.sleep(0.05)  # the request is out
        time.sleep(1.5)  # the loop is blocked, far past the timeout
        result = await probe
        t.join()
    assert result.status in (health.LOCAL, health.HEALTHY), result  # never the server's fault
    slow = await health.aprobe("127.0.0.1", _silent_port(), 0.2, pool.fetch)
    assert slow.status == health.ERROR and "no answer within 0.2s" in (slow.error or "")


def _silent_port() -> int:
    """A listener that never answers (kept open for the test session)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    _SILENT.append(s)
    return s.getsockname()[1]


_SILENT: list = []


async def test_the_daemons_probe_goes_through_its_one_client_and_tells_down_from_loading():
    """The daemon probes with the pool the router forwards through: refused
    is `down` (nothing listens yet), 503 is `loading`, and a deep check
    sends its completion as JSON with the instance's key."""
    import asyncio
    import contextlib
    import socket

    seen: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = b'{"error": {"message": "Loading model"}}'
        with contextlib.suppress(asyncio.IncompleteReadError):  # the pool closed it
            while head := await reader.readuntil(b"\r\n\r\n"):  # keep-alive, as llama-server
                lines = head.lower().split(b"\r\n")
                length = next((int(x[15:]) for x in lines if x.startswith(b"content-length:")), 0)
                seen.append(head + await reader.readexactly(length))
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\n")
                writer.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    pool = Pool()
    try:
        refused = await health.aprobe("127.0.0.1", closed, 1.0, pool.fetch)
        assert refused.status == health.DOWN and "refused" in (refused.error or "")
        loading = await health.aprobe("127.0.0.1", port, 1.0, pool.fetch)
        assert (loading.status, loading.http_status) == (health.LOADING, 503)
        deep = await health.aprobe("127.0.0.1", port, 1.0, pool.fetch, True, "k")
        assert deep.status == health.LOADING
        assert seen[0].startswith(b"GET /health HTTP/1.1")
        assert b"Connection: close" in seen[0]  # no server thread held between probes
        assert seen[1].startswith(b"POST /completion HTTP/1.1")
        assert (
            b"Authorization: Bearer k" in seen[1] and b"Content-Type: application/json" in seen[1]
        )
        assert seen[1].endswith(b'"n_predict": 1, "cache_prompt": false}')
    finally:
        pool.close()
        server.close()
