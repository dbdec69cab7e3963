"""What the router does with a request, decided on its method, path, query
and named model alone (pure, no I/O): llama-server's paths, which of them
hold a slot, which model a name means, and the CORS answer for a web page.

Every path llama-server answers is reachable through the router: the router
answers its own few (`OWN_GET`, the model list, /props in router mode) and
sends every other one to an instance of the model the request names (its
JSON body's `model`, or `?model=`), or of the only model served. A path
llama-server adds later therefore works without a release of ours.
`?instance=NAME` sends a request to that instance itself, unbalanced (slot
actions, an instance's own /metrics).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

from llama_orchestrator.names import TAG_PREFIX, alias_names, offers, tag_model, tag_set

__all__ = [
    "SLOT_POSTS",
    "MODEL_GETS",
    "takes_slot",
    "Unresolved",
    "resolve",
    "query_value",
    "without_param",
    "cors_headers",
    "origin_allowed",
    "PREFLIGHT_METHODS",
    "presented_key",
]

#: llama-server's POST routes that run the model on a slot: balanced over the
#: replicas' free slots, queued while every slot is busy. A POST to a path not
#: listed in `_LIGHT_POSTS` is taken as one too (a new generation endpoint).
SLOT_POSTS = frozenset(
    {
        "/completion",
        "/completions",
        "/v1/completions",
        "/chat/completions",
        "/v1/chat/completions",
        "/v1/responses",
        "/responses",
        "/v1/messages",
        "/infill",
        "/embedding",
        "/embeddings",
        "/v1/embeddings",
        "/rerank",
        "/reranking",
        "/v1/rerank",
        "/v1/reranking",
        "/v1/audio/transcriptions",
        "/audio/transcriptions",
    }
)
#: POST routes llama-server answers at once, without a slot (tokenizing,
#: templates, settings, slot actions)
_LIGHT_POSTS = frozenset(
    {
        "/tokenize",
        "/detokenize",
        "/apply-template",
        "/chat/completions/input_tokens",
        "/v1/chat/completions/input_tokens",
        "/responses/input_tokens",
        "/v1/responses/input_tokens",
        "/v1/messages/count_tokens",
        "/props",
        "/lora-adapters",
        "/v1/chat/completions/control",
    }
)
#: GET routes about one model: a request for them names the model (or there is
#: only one); any other GET (the web UI's pages) goes to any healthy instance
MODEL_GETS = frozenset({"/props", "/slots", "/metrics", "/lora-adapters"})
#: what a preflight may ask to send
PREFLIGHT_METHODS = "GET, POST, OPTIONS"


def takes_slot(method: str, path: str) -> bool:
    """Whether a request runs the model on a slot (and so waits for one)."""
    if method != "POST":
        return False
    return path in SLOT_POSTS or not (path in _LIGHT_POSTS or path.startswith("/slots"))


@dataclass(frozen=True)
class Unresolved:
    """A request's model name that names nothing served: 400 (none named,
    several served) or 404 (unknown), with what is served."""

    status: int
    message: str
    available: list[str]


def resolve(
    named: object,
    known: Collection[str],
    model_map: Mapping[str, str] | None = None,
    strict: bool = False,
    served: Iterable[str] = (),
) -> str | Unresolved:
    """The model a request means. `known`: every name the configs offer
    (aliases, `tags:` sets); `model_map`: names clients hard-code, mapped to
    ours; `served`: the alias strings of the instances (an alias list
    "a,b" is one model). With one model served, a missing, empty or
    unknown name means it, as llama-server itself answers (`strict`: only a
    missing or empty one)."""
    if isinstance(named, str) and model_map and named in model_map:
        named = model_map[named]
    if isinstance(named, str) and named.startswith(TAG_PREFIX):
        named = tag_model(tag_set(named))  # one queue per set of tags, in any order
    if isinstance(named, str) and named and offers(known, named):
        return named
    aliases = sorted(m for m in known if not m.startswith(TAG_PREFIX))
    only = _only_model(aliases, served)
    empty = named is None or named == ""
    if only is not None and (empty or (not strict and isinstance(named, str))):
        return only
    if not empty and isinstance(named, str):
        return Unresolved(
            404,
            f"The model '{named}' does not exist; available: {', '.join(aliases) or 'none'}.",
            aliases,
        )
    # the names the configs offer, running or not: "served" would claim too much
    what = "Name a model (this router has several)" if len(aliases) > 1 else "Name a model"
    if not aliases:
        what = "No model is configured here yet (`llama-orch init` makes one)"
    return Unresolved(400, f"{what}; available: {', '.join(aliases) or 'none'}.", aliases)


def _only_model(aliases: list[str], served: Iterable[str]) -> str | None:
    """The one model there is: a single alias, or the names of one alias list."""
    if len(aliases) == 1:
        return aliases[0]
    if not aliases:
        return None
    lists = {a for a in served if "," in a}
    if len(lists) == 1:
        (one,) = lists
        names = alias_names(one)
        if set(names) == set(aliases):
            return names[0]
    return None


def query_value(query: str, name: str) -> str | None:
    """The last value of `name` in a query string (None when absent)."""
    if name + "=" not in query:
        return None
    values = [v for k, v in parse_qsl(query, keep_blank_values=True) if k == name]
    return values[-1] if values else None


def without_param(query: str, name: str) -> str:
    """The query string less every `name=` (what an instance gets)."""
    return urlencode([(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != name])


def origin_allowed(origin: str, allowed: Collection[str]) -> bool:
    """Whether a page at `origin` may use the router (`allowed`: lower-case
    origins without a trailing slash, or "*")."""
    return "*" in allowed or origin.rstrip("/").lower() in allowed


def cors_headers(
    origin: str | None, allowed: Collection[str], preflight_headers: str | None = None
) -> list[tuple[str, str]] | None:
    """The CORS headers for a request from web page `origin`: None when the
    origin is not allowed (the browser then shows the page nothing; "*" in
    `allowed` allows every page). For a preflight (`preflight_headers`: its
    Access-Control-Request-Headers) the methods and headers it may send as well."""
    if origin is None or not origin_allowed(origin, allowed):
        return None
    headers = [("access-control-allow-origin", origin), ("vary", "Origin")]
    if preflight_headers is not None:
        headers += [
            ("access-control-allow-methods", PREFLIGHT_METHODS),
            (
                "access-control-allow-headers",
                preflight_headers or "authorization, content-type, x-api-key",
            ),
            ("access-control-max-age", "600"),
        ]
    return headers


def presented_key(headers: dict[str, str]) -> str:
    """The API key a request carries: `Authorization: Bearer K` or, as
    llama-server also takes it, `X-Api-Key: K` ("" when none)."""
    given = headers.get("authorization", "")
    if given[:7].lower() == "bearer ":
        return given[7:].strip()
    return headers.get("x-api-key", "").strip()
