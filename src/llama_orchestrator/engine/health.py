"""Health probes against llama-server's GET /health (DESIGN §4).

`classify` is the pure decision; `probe` does one request through a `Getter`
the caller may pass in (tests hand it a fake). The default getter is the
standard library's http.client: a probe is one GET on loopback (0.37 ms
here, against 0.17 ms for a raw socket of our own), and httpx costs a
short-lived CLI ~170 ms (import plus SSL context) before the first byte,
several times what the probes of ten instances take together.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ProbeResult",
    "Getter",
    "classify",
    "probe",
    "probe_host",
    "http_get",
    "http_request",
    "Requester",
    "aprobe",
    "HEALTHY",
    "LOADING",
    "DOWN",
    "ERROR",
    "LOCAL",
]

HEALTHY = "healthy"  # 200
LOADING = "loading"  # 503: the model is still loading
DOWN = "down"  # connection refused: nothing listens (yet)
ERROR = "error"  # timeout, other status, broken response
LOCAL = "local"  # the probe could not be made here (out of descriptors, memory): no verdict

#: errors that say the prober is short of something, not that the server is
_LOCAL_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}

#: get(host, port, path, timeout) -> (status, body); raises OSError on failure
Getter = Callable[[str, int, str, float], "tuple[int, str]"]
#: request(host, port, method, path, headers, body) -> (status, body) on the
#: event loop (the daemon's `wire.pool.Pool.fetch`); raises OSError on failure
Requester = Callable[[str, int, str, str, dict[str, str], bytes], Awaitable["tuple[int, str]"]]


@dataclass(frozen=True)
class ProbeResult:
    status: str
    http_status: int | None
    latency_ms: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == HEALTHY

    def to_json(self) -> dict[str, Any]:
        return {
            "healthy": self.ok,
            "status": self.status,
            "http_status": self.http_status,
            "latency_ms": round(self.latency_ms, 2),
            "error": self.error,
        }


def classify(http_status: int | None, refused: bool = False) -> str:
    if http_status == 200:
        return HEALTHY
    if http_status == 503:
        return LOADING
    if http_status is None and refused:
        return DOWN
    return ERROR


def probe_host(host: str) -> str:
    """Where to probe a server bound to `host` (a wildcard means loopback)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "::1"
    return host


def http_get(host: str, port: int, path: str, timeout: float) -> tuple[int, str]:
    """GET http://host:port/path; return (status, body). Raises OSError on failure."""
    return http_request(host, port, "GET", path, timeout)


def http_request(
    host: str,
    port: int,
    method: str,
    path: str,
    timeout: float,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> tuple[int, str]:
    """One HTTP/1.1 request with the standard library's http.client; (status,
    body). Raises OSError on failure (a malformed answer included)."""
    import http.client

    bracketed = f"[{host}]" if ":" in host and not host.startswith("[") else host
    conn = http.client.HTTPConnection(bracketed, port, timeout=timeout)
    sent = {**({"Content-Type": "application/json"} if body else {}), **(headers or {})}
    try:
        conn.request(method, path, body=body or None, headers=sent)
        answer = conn.getresponse()
        return answer.status, answer.read(_MAX_ANSWER).decode("utf-8", errors="replace")
    except http.client.HTTPException as exc:
        raise OSError(f"not an HTTP response ({type(exc).__name__}: {exc})") from exc
    finally:
        conn.close()


_MAX_ANSWER = 65536


#: the deep check: a 1-token completion (a server can answer /health while
#: every generation fails)
_COMPLETION = b'{"prompt": "Hi", "n_predict": 1, "cache_prompt": false}'


def _auth(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def probe(host: str, port: int, timeout: float, get: Getter = http_get) -> ProbeResult:
    start = time.perf_counter()
    try:
        answer = get(probe_host(host), port, "/health", timeout)
    except OSError as exc:
        return _failed(exc, start, timeout)
    return _answered(*answer, start)


async def aprobe(
    host: str,
    port: int,
    timeout: float,
    request: Requester,
    completion: bool = False,
    api_key: str | None = None,
) -> ProbeResult:
    """`probe` on the event loop, through the daemon's client (`request`);
    with `completion`, the deep check instead."""
    import asyncio

    method, path, body = (
        ("POST", "/completion", _COMPLETION) if completion else ("GET", "/health", b"")
    )
    # a connection of its own, closed after: a probe holds none of the server's
    # few HTTP threads, and one that cannot be made (no descriptor left) says so
    headers = {"Connection": "close", **_auth(api_key)}
    if body:
        headers["Content-Type"] = "application/json"
    start = time.perf_counter()
    try:
        answer = await asyncio.wait_for(
            request(probe_host(host), port, method, path, headers, body), timeout
        )
    except asyncio.TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
        late = time.perf_counter() - start - timeout
        if late > max(0.5, timeout / 2):  # the loop woke us late: it was busy, not the server
            ms = (time.perf_counter() - start) * 1000
            return ProbeResult(LOCAL, None, ms, f"the daemon was busy for {late:.1f}s")
        return _failed(TimeoutError(), start, timeout)
    except OSError as exc:
        return _failed(exc, start, timeout)
    return _answered(*answer, start)


def _failed(exc: BaseException, start: float, timeout: float) -> ProbeResult:
    ms = (time.perf_counter() - start) * 1000
    exc = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc  # what the system said
    if isinstance(exc, ConnectionRefusedError):
        return ProbeResult(DOWN, None, ms, f"connection refused ({exc})")
    if isinstance(exc, OSError) and exc.errno in _LOCAL_ERRNOS:
        return ProbeResult(LOCAL, None, ms, f"the probe could not be made here ({exc})")
    if isinstance(exc, TimeoutError):
        return ProbeResult(ERROR, None, ms, f"no answer within {timeout:g}s")
    return ProbeResult(ERROR, None, ms, f"{type(exc).__name__}: {exc}")


def _answered(status: int, body: str, start: float) -> ProbeResult:
    ms = (time.perf_counter() - start) * 1000
    result = classify(status)
    return ProbeResult(result, status, ms, None if result == HEALTHY else body[:200])
