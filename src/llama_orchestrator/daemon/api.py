"""The daemon's control API (FastAPI), spoken by `daemon.client`.

Bodies and replies are `daemon.protocol`'s classes, validated here; every
error is JSON, `{"error": {code, message, hint, exit_code}}`, with a 4xx
status for bad input, so the CLI re-raises the engine's own exception and
exits as it would have without a daemon. Handlers are `async def`: they run
on the event loop thread, where the supervisor and its runners live.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama_orchestrator import __version__
from llama_orchestrator.daemon.client import HOST
from llama_orchestrator.daemon.metrics import CONTENT_TYPE, Metrics
from llama_orchestrator.daemon.plans import PlanRunner
from llama_orchestrator.daemon.protocol import (
    Activity,
    CancelReply,
    DownReply,
    DownRequest,
    ErrorCode,
    LogsRequest,
    PlanReply,
    PlanRequest,
    RestartRequest,
    RetryReply,
    RmReply,
    RmRequest,
    ShutdownReply,
    ShutdownRequest,
    StatusReply,
    UpReply,
    UpRequest,
    code_of,
    error_to_json,
    http_status,
)
from llama_orchestrator.daemon.supervisor import Supervisor
from llama_orchestrator.engine.lifecycle import Engine
from llama_orchestrator.errors import OrchError
from llama_orchestrator.files import disk_full, is_disk_full
from llama_orchestrator.router.app import host_of

__all__ = ["build_app", "MAX_BODY_BYTES"]

MAX_BODY_BYTES = 1 << 20
_LOOPBACK = {HOST, "localhost", "127.0.0.1", "[::1]", "::1"}

log = logging.getLogger("llama_orchestrator.daemon")


def _error(code: ErrorCode, message: str, hint: str | None = None) -> JSONResponse:
    body = {"code": code.value, "message": message, "hint": hint, "exit_code": code.exit_code}
    return JSONResponse({"error": body}, status_code=http_status(code))


def build_app(
    sup: Supervisor,
    engine: Engine,
    metrics: Metrics,
    plans: PlanRunner,
    *,
    started_at: float,
    address: str,
    token: str | None,
    request_exit: Callable[[bool], None],
    status_view: Callable[[], Awaitable[StatusReply]],
    router_url: str | None = None,
    router_error: str | None = None,
    peers: Callable[[], dict[str, Any]] = dict,
) -> FastAPI:
    app = FastAPI(title="llama-orch daemon", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def guard(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if host_of(request.headers.get("host", "")) not in _LOOPBACK:
            return _error(
                ErrorCode.BAD_HOST, f"Host {request.headers.get('host')!r} is not served here."
            )
        given = request.headers.get("authorization", "")
        if token is not None and not secrets.compare_digest(given, f"Bearer {token}"):
            return _error(ErrorCode.UNAUTHORIZED, "A valid daemon token is required.")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return _too_large()
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return _error(
            ErrorCode.BAD_REQUEST,
            f"Bad request body: {where or 'body'}: {first.get('msg', 'invalid')}.",
        )

    @app.exception_handler(OrchError)
    async def orch_error(_: Request, exc: OrchError) -> JSONResponse:
        status = http_status(code_of(exc))
        return JSONResponse({"error": error_to_json(exc)}, status_code=status)

    @app.exception_handler(OSError)
    async def os_error(request: Request, exc: OSError) -> JSONResponse:
        """A full disk is said as such (where, how much room is left); any
        other fault of ours in our shape, never a bare HTTP 500."""
        if is_disk_full(exc):
            where = Path(exc.filename) if isinstance(exc.filename, str) else sup.home.root
            return await orch_error(request, disk_full(where, str(where)))
        log.error(f"{request.method} {request.url.path} failed", exc_info=exc)
        return _error(ErrorCode.FAILED, f"The daemon could not do it: {exc}.")

    def names(requested: list[str]) -> list[str]:
        return engine.resolve_names(requested)

    @app.get("/v1/status")
    async def status() -> dict[str, Any]:
        return {
            "running": True,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - started_at, 1),
            "home": str(sup.home.root),
            "socket": address,
            "router_url": router_url,
            "router_error": router_error,
            "version": __version__,
            "peers": peers(),
            **sup.status(),
        }

    @app.get("/v1/instances")
    async def instances() -> dict[str, Any]:
        return asdict(await status_view())

    @app.get("/v1/activity")
    async def activity() -> dict[str, Any]:
        return asdict(Activity(sup.loads(), dict(plans.router.in_flight), sup.upstream_states()))

    @app.post("/v1/up")
    async def up(body: UpRequest) -> dict[str, Any]:
        return asdict(UpReply(await sup.up(names(body.names), body.strict)))

    @app.post("/v1/down")
    async def down(body: DownRequest) -> dict[str, Any]:
        targets = names(body.names)
        if plans.leases is not None:
            plans.leases.keep_down(targets)  # a user's down outlasts a lease's restore
        return asdict(DownReply(await sup.down(targets, body.timeout)))

    @app.post("/v1/restart")
    async def restart(body: RestartRequest) -> dict[str, Any]:
        return asdict(UpReply(await sup.restart(names(body.names), body.rolling)))

    @app.post("/v1/logs")
    async def copy_logs(body: LogsRequest) -> dict[str, Any]:
        """A cluster home's `logs`: the nodes' logs copied here first."""
        await sup.effects.copy_logs(names(body.names))
        return {"copied": body.names}

    @app.post("/v1/rm")
    async def rm(body: RmRequest) -> dict[str, Any]:
        (name,) = names([body.name])
        await sup.rm(name, body.force)
        return asdict(RmReply(name))

    @app.post("/v1/shutdown")
    async def shutdown(body: ShutdownRequest) -> dict[str, Any]:
        request_exit(body.all)
        return asdict(ShutdownReply(True, "stop" if body.all else "keep running"))

    @app.post("/v1/plans")
    async def plan_run(body: PlanRequest) -> dict[str, Any]:
        run_id, unserved = plans.submit(body.text, body.source, body.base_dir, body.vars)
        return asdict(PlanReply(run_id, unserved))

    @app.post("/v1/plans/{run_id}/cancel")
    async def plan_cancel(run_id: str) -> dict[str, Any]:
        return asdict(CancelReply(await plans.cancel(run_id)))

    @app.post("/v1/plans/{run_id}/retry")
    async def plan_retry(run_id: str) -> dict[str, Any]:
        return asdict(RetryReply(plans.retry(run_id)))

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's and FastAPI's own refusals, in our `{"error"}` shape."""
        if _from_too_large(exc):  # FastAPI wraps what reading the body raised
            return _too_large()
        if exc.status_code in (404, 405):
            return _error(ErrorCode.NO_ROUTE, f"No route {request.method} {request.url.path}.")
        return _error(ErrorCode.BAD_REQUEST, f"Bad request: {exc.detail}.")

    app.add_middleware(_BodyLimit, limit=MAX_BODY_BYTES)
    return app


def _too_large() -> JSONResponse:
    return _error(ErrorCode.TOO_LARGE, f"Request bodies are limited to {MAX_BODY_BYTES} bytes.")


class _TooLarge(Exception):
    pass


def _from_too_large(exc: BaseException | None, depth: int = 0) -> bool:
    """Whether `exc` came of a body cut off by _BodyLimit (FastAPI raises its
    400 from it, and the middleware's task group wraps it in a group)."""
    if exc is None or depth > 8:
        return False
    if isinstance(exc, _TooLarge):
        return True
    inner = list(getattr(exc, "exceptions", ()))  # an ExceptionGroup
    return any(_from_too_large(e, depth + 1) for e in [exc.__cause__, *inner])


class _BodyLimit:
    """Counts a body's bytes as they arrive, so a chunked one (no
    Content-Length for the guard to read) is cut off at `limit` too."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        seen = 0
        started = False

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        async def watched(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _TooLarge:
            if started:
                raise
            await _too_large()(scope, receive, send)
