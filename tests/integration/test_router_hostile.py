"""The router's front against hostile and odd clients (issue 22), with raw
sockets on loopback against a real daemon and a real llama-server: every
count and wait is bounded."""

from __future__ import annotations

import json
import re
import socket
import time

import httpx
import pytest

from tests.helpers import free_port, run_cli, wait_until, write_config

pytestmark = pytest.mark.integration

LIMITS = {
    # long enough that opening 2 x max_connections never meets it on a slow machine
    "header_timeout": 4,
    "body_timeout": 4,
    "send_timeout": 6,
    "keepalive_timeout": 3,
    "max_connections": 24,
}


@pytest.fixture(scope="module")
def router(tmp_path_factory, tiny_model):
    """One daemon with small limits and one instance, for the whole module."""
    from llama_orchestrator.daemon.main import stop
    from llama_orchestrator.home import Home

    root = tmp_path_factory.mktemp("hostile")
    (root / "instances").mkdir()
    home = Home(root)
    port = free_port()
    settings = {"port": port, "allowed_origins": ["http://localhost:5173"], **LIMITS}
    home.settings_path.write_text(json.dumps({"router": settings}))
    write_config(home, "a", tiny_model, model={"alias": "tiny", "threads": 1})
    r = run_cli(home, "up", "a")
    assert r.returncode == 0, r.stderr
    yield home, port
    stop(home, all_=True)


def raw(port: int, data: bytes = b"", rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(15)
    s.connect(("127.0.0.1", port))
    if data:
        s.sendall(data)
    return s


def answer(s: socket.socket) -> bytes:
    """Everything until the router closes the connection (bounded by the timeout)."""
    got = b""
    while chunk := s.recv(65536):
        got += chunk
    s.close()
    return got


def status(data: bytes) -> int:
    m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    assert m, data[:200]
    return int(m[1])


def healthy(home) -> bool:
    rows = json.loads(run_cli(home, "ps", "--json").stdout)
    return rows[0]["state"] == "healthy" and rows[0]["restarts"] == 0


def test_a_slow_head_and_a_stalled_body_get_408_and_an_idle_connection_closes(router):
    home, port = router
    slow = raw(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    t0 = time.monotonic()
    try:
        for _ in range(60):  # a byte now and then does not keep it open
            slow.sendall(b"a")
            time.sleep(0.25)
    except OSError:
        pass  # closed under us: what we want
    got = answer(slow)
    assert status(got) == 408 and time.monotonic() - t0 < 14
    body = raw(
        port, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{"
    )
    assert status(answer(body)) == 408
    idle = raw(port)  # connects, says nothing
    assert answer(idle) == b""
    assert healthy(home)


def test_a_huge_head_is_refused_at_once_and_supervision_goes_on(router):
    home, port = router
    s = raw(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
    t0 = time.monotonic()
    try:
        for _ in range(64 * 16):  # 64 MB in 64 KB pieces, unless refused first
            s.sendall(b"x" * 65536)
    except OSError:
        pass
    got = answer(s)
    assert status(got) == 431 and time.monotonic() - t0 < 10
    assert healthy(home)


def test_at_twice_the_connection_cap_a_request_and_the_control_socket_still_answer(router):
    home, port = router
    stalled = [
        raw(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        for _ in range(2 * LIMITS["max_connections"])
    ]
    try:
        # the most stalled gave way at once, closed without a word (not a 408 of the
        # header timeout, which comes later): the first ones are gone, not the last
        stalled[0].settimeout(5)
        assert stalled[0].recv(100) == b""
        r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
        assert r.status_code == 200 and r.json()["healthy_instances"] == 1
        assert json.loads(run_cli(home, "daemon", "status", "--json").stdout)["running"]
    finally:
        for s in stalled:
            s.close()


def test_a_client_that_reads_nothing_frees_the_instance_and_is_dropped(router):
    home, port = router
    body = json.dumps(
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 1500,
            "ignore_eos": True,
            "stream": True,
        }
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    sleepers = [raw(port, head + body, rcvbuf=4096) for _ in range(2)]

    def in_flight() -> float:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        return sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("llama_orch_router_in_flight{")
        )

    try:
        # the answers are complete upstream (the tiny model is quick): the slots
        # are free while the clients, still connected, have read nothing of them
        for s in sleepers:  # their answers began (waits for it: no race with the start)
            assert s.recv(1, socket.MSG_PEEK) == b"H"  # HTTP/1.1 200 ...: all of it unread
        wait_until(lambda: in_flight() == 0, timeout=60, interval=0.2)
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": "tiny", "prompt": "Hi", "max_tokens": 2},
            timeout=30,
        )
        assert r.status_code == 200
        # and after send_timeout of reading nothing, they are dropped
        for s in sleepers:
            s.setblocking(False)
        deadline = time.monotonic() + LIMITS["send_timeout"] + 10
        open_ = list(sleepers)
        while open_ and time.monotonic() < deadline:
            for s in list(open_):
                try:
                    while s.recv(65536):
                        pass  # drain what it had been given
                    open_.remove(s)  # b"": closed by the router
                except BlockingIOError:
                    pass
                except OSError:
                    open_.remove(s)  # reset: dropped
            time.sleep(0.5)
        assert not open_
    finally:
        for s in sleepers:
            s.close()


CORNERS = [
    (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 200-ok\r\n\r\n", 417),
    (
        b"POST /completion HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        400,
    ),
    (
        b"POST /completion HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        b"POST /completion HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        400,
    ),
    (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: 1\r\n  folded\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\rHost: 127.0.0.1\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\x00b\r\n\r\n", 400),
]


@pytest.mark.parametrize(("request_bytes", "expected"), CORNERS)
def test_the_request_smuggling_corners_answer_as_nginx_does(router, request_bytes, expected):
    _, port = router
    got = answer(raw(port, request_bytes))
    assert status(got) == expected, got[:300]
    assert b"connection: close" in got.lower()


def test_an_http_1_0_client_gets_a_stream_ended_by_the_close_not_chunks(router):
    _, port = router
    body = json.dumps(
        {"model": "tiny", "prompt": "Hi", "max_tokens": 3, "stream": True, "ignore_eos": True}
    ).encode()
    got = answer(
        raw(
            port,
            b"POST /v1/completions HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(body)
            + body,
        )
    )
    head, _, rest = got.partition(b"\r\n\r\n")
    assert status(got) == 200 and b"transfer-encoding" not in head.lower()
    assert b"connection: close" in head.lower()
    assert rest.count(b"data: ") >= 3 and not re.match(rb"[0-9a-f]+\r\n", rest)


def test_a_cross_site_post_from_a_web_page_is_refused_unless_its_origin_is_allowed(router):
    """Issue 24.7: a "simple" text/plain POST needs no CORS answer to be served,
    so without this any page a user opens could spend the GPUs."""
    _, port = router
    body = json.dumps({"model": "tiny", "prompt": "Hi", "max_tokens": 1})
    url = f"http://127.0.0.1:{port}/v1/completions"
    plain = {"Content-Type": "text/plain"}
    r = httpx.post(url, content=body, headers={**plain, "Origin": "https://evil.example"})
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert "router.allowed_origins" in r.json()["error"]["message"]
    r = httpx.post(url, content=body, headers={**plain, "Origin": "http://localhost:5173"})
    assert r.status_code == 200, r.text
    assert httpx.post(url, content=body, headers=plain).status_code == 200  # no browser


def test_no_traceback_in_the_daemon_log(router):
    home, _ = router
    text = (home.root / "logs" / "daemon.log").read_text()
    assert "Traceback" not in text and '"level": "ERROR"' not in text
