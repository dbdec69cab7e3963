"""Health probes against llama-server's GET /health (DESIGN §4).

`classify` is the pure decision; `probe` does one request with a client the
caller passes in (so tests can hand it a MockTransport).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx

__all__ = ["ProbeResult", "classify", "probe", "probe_host", "HEALTHY", "LOADING", "DOWN", "ERROR"]

HEALTHY = "healthy"  # 200
LOADING = "loading"  # 503: the model is still loading
DOWN = "down"  # connection refused: nothing listens (yet)
ERROR = "error"  # timeout, other status, broken response


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


def probe(client: httpx.Client, host: str, port: int, timeout: float) -> ProbeResult:
    h = probe_host(host)
    url = f"http://[{h}]:{port}/health" if ":" in h else f"http://{h}:{port}/health"
    start = time.perf_counter()
    try:
        r = client.get(url, timeout=timeout)
    except httpx.ConnectError as exc:
        ms = (time.perf_counter() - start) * 1000
        return ProbeResult(classify(None, refused=True), None, ms, f"connection refused ({exc})")
    except httpx.HTTPError as exc:
        ms = (time.perf_counter() - start) * 1000
        return ProbeResult(ERROR, None, ms, f"{type(exc).__name__}: {exc}")
    ms = (time.perf_counter() - start) * 1000
    status = classify(r.status_code)
    return ProbeResult(status, r.status_code, ms, None if status == HEALTHY else r.text[:200])
