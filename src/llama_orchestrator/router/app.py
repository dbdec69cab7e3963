"""The router's HTTP surface: which route does what, and who may ask.
Auth, the Host check and the body limit are decided on a request's head,
before its body is read. The router's own routes are answered here; every
other request goes to the model it names (`routes`), where `Router`
balances, queues and forwards it. The wire (HTTP/1.1, keep-alive,
streaming) is `wire.server`'s."""

from __future__ import annotations

import ipaddress
import json
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from llama_orchestrator.errors import OrchError
from llama_orchestrator.names import TAG_PREFIX
from llama_orchestrator.router.balance import lightest
from llama_orchestrator.router.peers import INSTANCES_PATH, STATE_PATH, rows_for_peers, state_of
from llama_orchestrator.router.proxy import JSON_HEADER as _JSON
from llama_orchestrator.router.proxy import Router, openai_error
from llama_orchestrator.router.routes import (
    MODEL_GETS,
    PREFLIGHT_METHODS,
    Unresolved,
    cors_headers,
    origin_allowed,
    presented_key,
    query_value,
    resolve,
    takes_slot,
    without_param,
)
from llama_orchestrator.wire.server import Reply, Request, Stream

__all__ = ["RouterSite", "ModelControl", "is_loopback", "host_of", "OWN_GET"]

_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "[::1]", "::1"}
#: the router's own GET routes (a request with `?instance=` goes to the instance)
OWN_GET = {"/v1/models", "/models", "/health", "/v1/health", "/metrics", STATE_PATH, INSTANCES_PATH}
#: answered without an API key, as llama-server answers them
_PUBLIC = {"/health", "/v1/health"}


class ModelControl(Protocol):
    """The daemon's side of llama-server's model management API (its router
    mode, which its web UI uses): what each model's instances are doing,
    and starting or stopping them."""

    def statuses(self) -> dict[str, dict[str, Any]]:
        """Every model of this machine's configs, by the id /v1/models gives
        it -> {"value": "loaded" | "loading" | "unloaded", "aliases": [...],
        "instances": [...]} (and "failed": true)."""

    async def load(self, model: str) -> None:
        """Start what serves `model`; raises OrchError with the reason."""

    async def unload(self, model: str) -> None:
        """Stop what serves `model`; raises OrchError with the reason."""


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
        models: ModelControl | None = None,
    ) -> None:
        self.router = router
        self.render_metrics = render_metrics
        #: this machine's `ps --json` rows, for the peers' `ps --all-hosts`
        self.instances = instances
        #: loads and unloads for /models/load and /models/unload (None: refused)
        self.models = models if router.settings.model_control else None
        settings = router.settings
        self.keys = [*settings.api_keys, *settings.batch_api_keys]
        # Bound to loopback: only loopback names may reach us (DNS rebinding);
        # bound wider, API keys are required and a browser cannot present one.
        self.check_host = all(is_loopback(h) for h in settings.hosts())
        self.limit = settings.max_body_bytes
        self.origins = {o.rstrip("/").lower() for o in settings.allowed_origins}

    def check(self, request: Request) -> Reply | None:
        headers = request.headers
        if self.check_host and host_of(headers.get("host", "")) not in _LOOPBACK_NAMES:
            return openai_error(421, "This Host is not served here.", "permission_error")
        origin = headers.get("origin")
        if request.method == "OPTIONS":
            return None  # a preflight carries no key: `handle` answers it
        public = (
            request.path in _PUBLIC
            and request.method in ("GET", "HEAD")
            and "instance=" not in request.query
        )
        if self.keys and not public:
            given = presented_key(headers)
            if not any(secrets.compare_digest(given, k) for k in self.keys):
                refused = openai_error(
                    401,
                    "A valid API key is required (Authorization: Bearer KEY, or X-Api-Key).",
                    "authentication_error",
                )
                self._cors(refused, origin)
                return refused
        if origin is not None and not self.keys and not origin_allowed(origin, self.origins):
            # a browser says which page sent it: a "simple" cross-site POST needs no
            # CORS answer to be served, so any page could spend the GPUs
            return openai_error(
                403,
                f"Requests from the web page {origin} are refused; add it to "
                "router.allowed_origins in llama-orch.json if it is yours.",
                "permission_error",
            )
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            too_large = self.too_large()
            self._cors(too_large, origin)
            return too_large
        return None

    def too_large(self) -> Reply:
        return openai_error(
            413, f"Request bodies are limited to {self.limit} bytes.", "invalid_request_error"
        )

    def _cors(
        self, reply: Reply | Stream, origin: str | None, preflight: str | None = None
    ) -> None:
        """Adds to `reply` the CORS headers `origin` gets (none unless allowed)."""
        if origin is not None and (extra := cors_headers(origin, self.origins, preflight)):
            reply.headers.extend(extra)

    async def handle(self, request: Request) -> Reply | Stream:
        origin = request.headers.get("origin")
        if request.method == "OPTIONS":
            return self._preflight(request, origin)
        answer = await self._route(request)
        if origin is not None:
            self._cors(answer, origin)
        return answer

    def _preflight(self, request: Request, origin: str | None) -> Reply:
        """A browser asks whether its page may send a request: 200 always, as
        llama-server answers; the CORS headers that say yes (the methods and
        headers it may use) for an allowed origin only, so the browser
        refuses every other page."""
        reply = Reply(200, headers=[("allow", PREFLIGHT_METHODS)])
        self._cors(reply, origin, request.headers.get("access-control-request-headers", ""))
        return reply

    async def _route(self, request: Request) -> Reply | Stream:
        path, method = request.path, request.method
        if "instance=" not in request.query:
            if method in ("GET", "HEAD") and path in OWN_GET:
                return await self._get(path)
            if (
                path == "/props"
                and method == "GET"
                and "model=" not in request.query
                and (props := self._router_props()) is not None
            ):
                return props
            if method == "POST" and path in ("/models/load", "/models/unload"):
                return await self._load_or_unload(request, path == "/models/load")
        if method == "HEAD":  # the instance's GET answer, of which the wire sends the head
            request = Request(
                "GET", path, request.headers, request.body, request.query, request.version
            )
        return await self._to_model(request)

    async def _to_model(self, request: Request) -> Reply | Stream:
        """A request for an instance (see `routes`): with `?instance=NAME` to
        that instance; else to the model it names (its JSON body's `model`,
        or `?model=`), balanced over its replicas' slots when it runs the
        model. The body's size was checked on the head, by `check`."""
        router = self.router
        instance = query_value(request.query, "instance")
        if instance is not None:
            return await self._to_instance(request, instance)
        named = _named(request)
        if isinstance(named, Reply):
            return named
        slot = takes_slot(request.method, request.path)
        if named is None and request.method == "GET" and request.path not in MODEL_GETS:
            # a page of the web UI: every instance serves the same
            r = lightest(router.local(), router.in_flight)
            if r is not None:
                return await router.send_to(r, request)
        model = self.resolve(named)
        if isinstance(model, Reply):
            return model
        if slot:
            return await router.forward(request, model)
        return await router.handle_light(request, model)

    async def _to_instance(self, request: Request, name: str) -> Reply | Stream:
        """`?instance=NAME`: to that instance of this machine, the parameter
        removed (its slot actions, its own /metrics)."""
        found = self.router.local(name)
        if not found:
            healthy = ", ".join(sorted(r.name for r in self.router.local())) or "none"
            return openai_error(
                404,
                f"No healthy instance '{name}' here (healthy: {healthy}); "
                "`llama-orch ps` shows them all.",
                "not_found_error",
            )
        query = without_param(request.query, "instance")
        return await self.router.send_to(
            found[0],
            Request(
                request.method, request.path, request.headers, request.body, query, request.version
            ),
        )

    def resolve(self, named: Any) -> str | Reply:
        """The model a request names, as the router queues it (see
        `routes.resolve`: with one model served, any name means it); else a
        400/404 that lists what there is."""
        s = self.router.settings
        known = self.router.known()
        if isinstance(named, str) and named in known and named not in s.model_map:
            return named  # the common case: a name served, as it is
        served = {r.alias for r in self.router.replicas()}
        model = resolve(named, known, s.model_map, s.strict_models, served)
        if isinstance(model, Unresolved):
            return openai_error(
                model.status,
                model.message,
                "not_found_error" if model.status == 404 else "invalid_request_error",
                available=model.available,
            )
        return model

    async def _get(self, path: str) -> Reply:
        if path == "/v1/models":
            return _json({"object": "list", "data": await self._model_entries(False)})
        if path == "/models":
            return _json({"object": "list", "data": await self._model_entries(True)})
        if path == STATE_PATH:  # what peers ask (with a key, as any client when keys are set)
            return _json(state_of(self.router.replicas(), self.router.in_flight))
        if path == INSTANCES_PATH:  # read-only, as /v1/models: what `ps` would show here
            rows = await self.instances() if self.instances is not None else []
            return _json(rows_for_peers(rows))
        if path in ("/health", "/v1/health"):
            return self._health()
        body, content_type = self.render_metrics()
        return Reply(200, body, [("content-type", content_type)])

    def _health(self) -> Reply:
        """200 while a request can be served (an instance is healthy, or a
        model loads on demand); 503 before, as llama-server while it loads."""
        healthy = len(self.router.replicas())
        lazy = len(self.router.loader.models()) if self.router.loader is not None else 0
        body: dict[str, Any] = {"status": "ok", "healthy_instances": healthy}
        if lazy:
            body["on_demand_models"] = lazy
        if healthy or lazy:
            return _json(body)
        body["status"] = "unavailable"
        body["error"] = {
            "code": 503,
            "message": "No instance is healthy yet; `llama-orch ps` shows what is starting.",
            "type": "unavailable_error",
        }
        return _json(body, 503)

    async def _model_entries(self, every: bool) -> list[dict[str, Any]]:
        """/v1/models: what may be asked now (healthy, or loaded on demand).
        /models (`every`): each model of this machine's configs as well,
        loaded or not, as llama-server's router mode lists them for its web UI."""
        served = await self.router.model_list()
        statuses = self.models.statuses() if self.models is not None else {}
        for entry in served:
            entry["status"] = _status(statuses.get(entry["id"]), loaded=True)
        if not every:
            return served
        listed = {e["id"] for e in served}
        return served + [
            {
                "id": model,
                "aliases": seen["aliases"],
                "object": "model",
                "owned_by": "llama-orch",
                "created": int(self.router.started),
                "status": _status(seen, loaded=False),
            }
            for model, seen in sorted(statuses.items())
            if model not in listed
        ]

    def _router_props(self) -> Reply | None:
        """GET /props without `?model=` while several models are served: the
        answer of llama-server's router mode, which makes its web UI list the
        models and let the user pick one (None: one model; its own /props)."""
        aliases = [n for n in self.router.known() if not n.startswith(TAG_PREFIX)]
        if len(aliases) < 2:
            return None
        return _json(
            {
                "role": "router",
                "max_instances": len(aliases),
                "models_autoload": self.router.loader is not None,
                "model_alias": "llama-orch",
                "model_path": "none",
                "default_generation_settings": {"params": {}, "n_ctx": 0},
                "build_info": "llama-orch",
            }
        )

    async def _load_or_unload(self, request: Request, load: bool) -> Reply:
        """POST /models/load or /models/unload {"model": NAME}: the model's
        instances started (on-demand ones as a request would) or stopped."""
        if self.models is None:
            return openai_error(
                403,
                "Loading and unloading models through the router is off "
                "(router.model_control in llama-orch.json).",
                "permission_error",
            )
        try:
            data = json.loads(request.body or b"{}")
        except ValueError as exc:
            return openai_error(
                400, f"The request body is not valid JSON ({exc}).", "invalid_request_error"
            )
        model = data.get("model") if isinstance(data, dict) else None
        known = self.router.known()
        if not isinstance(model, str) or not model or model not in known:
            aliases = sorted(n for n in known if not n.startswith(TAG_PREFIX))
            return openai_error(
                404 if model else 400,
                f"The model '{model}' does not exist; available: {', '.join(aliases) or 'none'}."
                if model
                else f"Name a model; available: {', '.join(aliases) or 'none'}.",
                "not_found_error" if model else "invalid_request_error",
            )
        try:
            await (self.models.load(model) if load else self.models.unload(model))
        except OrchError as exc:
            return openai_error(400, exc.message, "invalid_request_error")
        return _json({"success": True})


def _named(request: Request) -> Any:
    """The model a request names: its JSON body's `model`, else `?model=`
    (None when neither does); a 400 for a body that should be JSON and is not."""
    named = None
    body = request.body
    if body and "json" in request.headers.get("content-type", "application/json"):
        try:
            data = json.loads(body)
        except ValueError as exc:
            return openai_error(
                400, f"The request body is not valid JSON ({exc}).", "invalid_request_error"
            )
        if not isinstance(data, dict):
            return openai_error(
                400, "The request body must be a JSON object.", "invalid_request_error"
            )
        named = data.get("model")
    if named is None and request.query:
        named = query_value(request.query, "model")
    return named


def _status(seen: dict[str, Any] | None, loaded: bool) -> dict[str, Any]:
    """A model's `status` as llama-server's router mode gives it."""
    status: dict[str, Any] = {"value": "loaded" if loaded else "unloaded", "args": []}
    for key, value in (seen or {}).items():
        if key != "aliases" and (key != "value" or not loaded):
            status[key] = value
    return status


def _json(data: object, status: int = 200) -> Reply:
    return Reply(status, json.dumps(data).encode(), [_JSON])
