"""Health probes against llama-server's GET /health (DESIGN §4).

`classify` is the pure decision; `probe` does one request through a `Getter`
the caller may pass in (tests hand it a fake). The default getter is the
standard library's http.client: a probe is one GET on loopback, and httpx
costs a short-lived CLI ~170 ms (import plus SSL context) before the first
byte, several times what the probes of ten instances take together.
"""

from __future__ import annotations

import http.client
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "ProbeResult",
    "Getter",
    "classify",
    "probe",
    "probe_host",
    "http_get",
    "HEALTHY",
    "LOADING",
    "DOWN",
    "ERROR",
]

HEALTHY = "healthy"  # 200
LOADING = "loading"  # 503: the model is still loading
DOWN = "down"  # connection refused: nothing listens (yet)
ERROR = "error"  # timeout, other status, broken response

#: get(host, port, path, timeout) -> (status, body); raises OSError on failure
Getter = Callable[[str, int, str, float], "tuple[int, str]"]


@dataclass(frozen=True)
class ProbeResult:
    status: str
    http_status: int | None
    latency_ms: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == HEALTHY


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
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read(4096).decode("utf-8", errors="replace")
    except http.client.HTTPException as exc:  # a broken response is an OSError to callers
        raise OSError(f"bad HTTP response: {exc!r}") from exc
    finally:
        conn.close()


def probe(host: str, port: int, timeout: float, get: Getter = http_get) -> ProbeResult:
    start = time.perf_counter()
    try:
        status, body = get(probe_host(host), port, "/health", timeout)
    except ConnectionRefusedError as exc:
        ms = (time.perf_counter() - start) * 1000
        return ProbeResult(DOWN, None, ms, f"connection refused ({exc})")
    except TimeoutError:
        ms = (time.perf_counter() - start) * 1000
        return ProbeResult(ERROR, None, ms, f"no answer within {timeout:g}s")
    except OSError as exc:
        ms = (time.perf_counter() - start) * 1000
        return ProbeResult(ERROR, None, ms, f"{type(exc).__name__}: {exc}")
    ms = (time.perf_counter() - start) * 1000
    result = classify(status)
    return ProbeResult(result, status, ms, None if result == HEALTHY else body[:200])
