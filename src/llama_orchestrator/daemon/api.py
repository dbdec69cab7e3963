"""The daemon's control API (FastAPI), spoken by `daemon.client`.

Every error is JSON, `{"error": {kind, message, hint, exit_code}}`, with a 4xx
status for bad input, so the CLI re-raises the engine's own exception and exits
as it would have without a daemon. Handlers are `async def`: they run on the
event loop thread, where the supervisor and its store live.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from llama_orchestrator import __version__
from llama_orchestrator.daemon.client import HOST, error_to_json
from llama_orchestrator.daemon.metrics import CONTENT_TYPE, Metrics
from llama_orchestrator.daemon.plans import PlanRunner
from llama_orchestrator.daemon.supervisor import Supervisor
from llama_orchestrator.errors import OrchError, UnknownInstance, UserError
from llama_orchestrator.router.app import host_of

__all__ = ["build_app", "MAX_BODY_BYTES"]

MAX_BODY_BYTES = 1 << 20
_LOOPBACK = {HOST, "localhost", "127.0.0.1", "[::1]", "::1"}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UpBody(_Body):
    names: list[str] = Field(min_length=1)
    strict: bool = False


class DownBody(_Body):
    names: list[str] = Field(min_length=1)
    timeout: float | None = Field(None, ge=0)


class RestartBody(_Body):
    names: list[str] = Field(min_length=1)
    rolling: bool = False


class RmBody(_Body):
    name: str
    force: bool = False


class ShutdownBody(_Body):
    all: bool = False


class PlanBody(_Body):
    text: str
    source: str
    base_dir: str
    vars: dict[str, str] = {}


def _error(status: int, kind: str, message: str, hint: str | None = None) -> JSONResponse:
    body = {"kind": kind, "message": message, "hint": hint, "exit_code": 2 if status < 500 else 1}
    return JSONResponse({"error": body}, status_code=status)


def build_app(
    sup: Supervisor,
    metrics: Metrics,
    plans: PlanRunner,
    *,
    started_at: float,
    address: str,
    token: str | None,
    request_exit: Callable[[bool], None],
    router_url: str | None = None,
) -> FastAPI:
    app = FastAPI(title="llama-orch daemon", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def guard(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if host_of(request.headers.get("host", "")) not in _LOOPBACK:
            return _error(
                421, "BadHost", f"Host {request.headers.get('host')!r} is not served here."
            )
        given = request.headers.get("authorization", "")
        if token is not None and not secrets.compare_digest(given, f"Bearer {token}"):
            return _error(401, "Unauthorized", "A valid daemon token is required.")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return _error(413, "TooLarge", f"Request bodies are limited to {MAX_BODY_BYTES} bytes.")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return _error(
            400,
            "BadRequest",
            f"Bad request body: {where or 'body'}: {first.get('msg', 'invalid')}.",
        )

    @app.exception_handler(OrchError)
    async def orch_error(_: Request, exc: OrchError) -> JSONResponse:
        status = (
            404 if isinstance(exc, UnknownInstance) else 400 if isinstance(exc, UserError) else 500
        )
        return JSONResponse({"error": error_to_json(exc)}, status_code=status)

    def names(requested: list[str]) -> list[str]:
        return sup.engine.resolve_names(requested)

    @app.get("/v1/status")
    async def status() -> dict[str, Any]:
        return {
            "running": True,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - started_at, 1),
            "home": str(sup.home.root),
            "socket": address,
            "router_url": router_url,
            "version": __version__,
            **sup.status(),
        }

    @app.post("/v1/up")
    async def up(body: UpBody) -> dict[str, Any]:
        results = await sup.up(names(body.names), body.strict)
        return {"results": [r.__dict__ for r in results]}

    @app.post("/v1/down")
    async def down(body: DownBody) -> dict[str, Any]:
        return {"stopped": await sup.down(names(body.names), body.timeout)}

    @app.post("/v1/restart")
    async def restart(body: RestartBody) -> dict[str, Any]:
        results = await sup.restart(names(body.names), body.rolling)
        return {"results": [r.__dict__ for r in results]}

    @app.post("/v1/rm")
    async def rm(body: RmBody) -> dict[str, Any]:
        (name,) = names([body.name])
        await sup.rm(name, body.force)
        return {"removed": name}

    @app.post("/v1/shutdown")
    async def shutdown(body: ShutdownBody) -> dict[str, Any]:
        request_exit(body.all)
        return {"stopping": True, "instances": "stop" if body.all else "keep running"}

    @app.post("/v1/plans")
    async def plan_run(body: PlanBody) -> dict[str, Any]:
        run_id, unserved = plans.submit(body.text, body.source, body.base_dir, body.vars)
        return {"id": run_id, "unserved": unserved}

    @app.post("/v1/plans/{run_id}/cancel")
    async def plan_cancel(run_id: str) -> dict[str, Any]:
        return {"cancelled": await plans.cancel(run_id)}

    @app.post("/v1/plans/{run_id}/retry")
    async def plan_retry(run_id: str) -> dict[str, Any]:
        return {"requeued": plans.retry(run_id)}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.exception_handler(404)
    async def not_found(request: Request, _: Exception) -> JSONResponse:
        return _error(404, "NotFound", f"No route {request.method} {request.url.path}.")

    return app
