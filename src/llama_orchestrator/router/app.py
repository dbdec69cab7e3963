"""The router's HTTP surface (Starlette: FastAPI's core, without per-request
validation on the hot path). Auth, the Host check and body limits are here;
everything else is `Router`'s."""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from llama_orchestrator.router.proxy import Router, openai_error

__all__ = ["build_router_app", "is_loopback", "host_of", "PROXIED"]

PROXIED = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/completion")
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "[::1]", "::1"}

Handler = Callable[[Request], Awaitable[Response]]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_of(header: str) -> str:
    """`Host` without its port: "[::1]:9" -> "[::1]", "localhost:9" -> "localhost"."""
    if header.startswith("["):
        return header.split("]")[0] + "]"
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def build_router_app(router: Router, render_metrics: Callable[[], tuple[bytes, str]]) -> ASGIApp:
    settings = router.settings
    keys = [f"Bearer {k}" for k in settings.api_keys]
    # Bound to loopback: only loopback names may reach us (DNS rebinding);
    # bound wider, API keys are required and a browser cannot present one.
    check_host = is_loopback(settings.host)

    def guarded(handler: Handler, auth: bool = True) -> Handler:
        async def wrapper(request: Request) -> Response:
            if check_host and host_of(request.headers.get("host", "")) not in _LOOPBACK_NAMES:
                return openai_error(421, "This Host is not served here.", "bad_host")
            if auth and keys:
                given = request.headers.get("authorization", "")
                if not any(secrets.compare_digest(given, k) for k in keys):
                    return openai_error(401, "A valid API key is required.", "unauthorized")
            return await handler(request)

        return wrapper

    async def models(request: Request) -> Response:
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "llama-orch"}
            for m in router.models()
        ]
        return JSONResponse({"object": "list", "data": data})

    async def health(request: Request) -> Response:
        n = len(router.replicas())
        return JSONResponse({"status": "ok", "healthy_instances": n})

    async def metrics(request: Request) -> Response:
        body, content_type = render_metrics()
        return Response(body, media_type=content_type)

    proxied = guarded(router.handle)
    rest = Starlette(
        routes=[
            Route("/v1/models", guarded(models), methods=["GET"]),
            Route("/health", guarded(health, auth=False), methods=["GET"]),
            Route("/metrics", guarded(metrics), methods=["GET"]),
        ]
    )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        """The proxied routes straight to the router (the hot path skips
        Starlette's routing and middleware); everything else through Starlette."""
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in PROXIED:
            response = await proxied(Request(scope, receive))
            await response(scope, receive, send)
        else:
            await rest(scope, receive, send)

    return app
