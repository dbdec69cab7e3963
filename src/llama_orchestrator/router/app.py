"""The router's HTTP surface: which route does what, and who may ask.
Auth, the Host check and the body limit are decided on a request's head,
before its body is read; the proxied routes are `Router.handle`'s. The wire
(HTTP/1.1, keep-alive, streaming) is `wire.server`'s."""

from __future__ import annotations

import ipaddress
import json
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from llama_orchestrator.router.peers import INSTANCES_PATH, STATE_PATH, rows_for_peers, state_of
from llama_orchestrator.router.proxy import LIGHT, Router, openai_error
from llama_orchestrator.wire.server import Reply, Request, Stream

__all__ = ["RouterSite", "is_loopback", "host_of", "PROXIED"]

PROXIED = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/completion")
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "[::1]", "::1"}
_GET = {"/v1/models", "/health", "/metrics", STATE_PATH, INSTANCES_PATH}


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


class RouterSite:
    """What `wire.server.serve` answers with: the routes of DESIGN §6."""

    def __init__(
        self,
        router: Router,
        render_metrics: Callable[[], tuple[bytes, str]],
        instances: Callable[[], Awaitable[list[dict[str, Any]]]] | None = None,
    ) -> None:
        self.router = router
        self.render_metrics = render_metrics
        #: this machine's `ps --json` rows, for the peers' `ps --all-hosts`
        self.instances = instances
        settings = router.settings
        self.keys = [f"Bearer {k}" for k in [*settings.api_keys, *settings.batch_api_keys]]
        # Bound to loopback: only loopback names may reach us (DNS rebinding);
        # bound wider, API keys are required and a browser cannot present one.
        self.check_host = is_loopback(settings.host)
        self.limit = settings.max_body_bytes
        self.origins = {o.rstrip("/").lower() for o in settings.allowed_origins}

    def check(self, request: Request) -> Reply | None:
        headers = request.headers
        if self.check_host and host_of(headers.get("host", "")) not in _LOOPBACK_NAMES:
            return openai_error(421, "This Host is not served here.", "bad_host")
        if self.keys and request.path != "/health":
            given = headers.get("authorization", "")
            if not any(secrets.compare_digest(given, k) for k in self.keys):
                return openai_error(401, "A valid API key is required.", "unauthorized")
        origin = headers.get("origin")
        if origin is not None and not self.keys and origin.rstrip("/").lower() not in self.origins:
            # a browser says which page sent it: a "simple" cross-site POST needs no
            # CORS answer to be served, so any page could spend the GPUs
            return openai_error(
                403,
                f"Requests from the web page {origin} are refused; add it to "
                "router.allowed_origins in llama-orch.json if it is yours.",
                "forbidden_origin",
            )
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            return self.too_large()
        return None

    def too_large(self) -> Reply:
        return openai_error(413, f"Request bodies are limited to {self.limit} bytes.", "too_large")

    async def handle(self, request: Request) -> Reply | Stream:
        path = request.path
        if request.method == "POST" and path in PROXIED:
            return await self.router.handle(request)
        if request.method == LIGHT.get(path):
            return await self.router.handle_light(request)
        if request.method in ("GET", "HEAD") and path in _GET:
            return await self._get(path)
        if path in PROXIED or path in _GET or path in LIGHT:
            allowed = "POST" if path in PROXIED else LIGHT.get(path, "GET")
            reply = openai_error(405, f"{path} takes {allowed}.", "method_not_allowed")
            reply.headers.append(("allow", allowed))
            return reply
        return openai_error(404, f"There is no route {request.path}.", "not_found")

    async def _get(self, path: str) -> Reply:
        if path == "/v1/models":
            return _json({"object": "list", "data": await self.router.model_list()})
        if path == STATE_PATH:  # what peers ask (with a key, as any client when keys are set)
            return _json(state_of(self.router.replicas(), self.router.in_flight))
        if path == INSTANCES_PATH:  # read-only, as /v1/models: what `ps` would show here
            rows = await self.instances() if self.instances is not None else []
            return _json(rows_for_peers(rows))
        if path == "/health":
            return _json({"status": "ok", "healthy_instances": len(self.router.replicas())})
        body, content_type = self.render_metrics()
        return Reply(200, body, [("content-type", content_type)])


def _json(data: object) -> Reply:
    return Reply(200, json.dumps(data).encode(), [("content-type", "application/json")])
