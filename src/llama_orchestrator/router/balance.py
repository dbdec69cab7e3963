"""Which instance gets a request (DESIGN §6): pure functions, no I/O.

A request names a `model` (`names`): an instance alias (several instances
may share one: replicas) or `tags:<tag>[,<tag>...]`, served by an instance
that carries every tag listed (`tags:worker,gpu`). Among the healthy, non-draining candidates
with a free slot the least busy wins: the lowest share of its `parallel`
slots in use, then the fewest requests in flight, then the name (stable).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from llama_orchestrator.names import alias_names, serves

__all__ = [
    "Replica",
    "matches",
    "candidates",
    "least_busy",
    "lightest",
    "free_slots",
    "model_names",
    "model_id",
    "hosts_of",
]


@dataclass(frozen=True)
class Replica:
    """A healthy instance as the router sees it."""

    name: str
    alias: str
    tags: tuple[str, ...]
    host: str
    port: int
    slots: int  # llama-server's parallel slots (-np); an upstream's max_concurrent
    api_key: str | None = None
    #: an external upstream: the model name it knows (None: an instance of ours)
    remote: str | None = None
    base: str = ""  # its URL's path (/v1), which request paths continue
    tls: bool = False  # https
    #: another machine's router serving it (`router.peers`); None: this machine
    peer: str | None = None
    #: the cluster node it runs on (a cluster home); None: this machine
    node: str | None = None


def matches(model: str, r: Replica) -> bool:
    return serves(model, r.alias, r.tags)


def candidates(model: str, replicas: Iterable[Replica]) -> list[Replica]:
    return [r for r in replicas if matches(model, r)]


def least_busy(
    cands: Iterable[Replica], in_flight: Mapping[str, int], exclude: frozenset[str] = frozenset()
) -> Replica | None:
    """The candidate to use now, or None when every one is full (or excluded)."""
    free = [
        r for r in cands if r.name not in exclude and in_flight.get(r.name, 0) < max(1, r.slots)
    ]
    if not free:
        return None
    return min(
        free,
        key=lambda r: (
            in_flight.get(r.name, 0) / max(1, r.slots),
            in_flight.get(r.name, 0),
            r.name,
        ),
    )


def lightest(cands: Iterable[Replica], in_flight: Mapping[str, int]) -> Replica | None:
    """The least loaded candidate, full or not: for a request that takes no
    slot (/tokenize, /props ...), which llama-server answers at once."""
    return min(
        cands,
        key=lambda r: (in_flight.get(r.name, 0) / max(1, r.slots), r.name),
        default=None,
    )


def free_slots(model: str, replicas: Iterable[Replica], in_flight: Mapping[str, int]) -> int:
    """Slots not in use over every replica that serves `model`."""
    return sum(
        max(0, max(1, r.slots) - in_flight.get(r.name, 0)) for r in candidates(model, replicas)
    )


def model_id(alias: str) -> str:
    """The one name /v1/models lists a model by: an alias list's first name
    in sorted order, as llama-server lists itself ("qwen,default" -> "default")."""
    return min(alias_names(alias))


def model_names(replicas: Iterable[Replica]) -> list[str]:
    """What /v1/models lists: one id per model of the healthy instances."""
    return sorted({model_id(r.alias) for r in replicas})


def hosts_of(alias: str, replicas: Iterable[Replica]) -> list[str]:
    """Where `alias` runs: "local" (this machine), "upstream" (an external
    API), the peers' names and the cluster nodes' names."""
    return sorted(
        {
            r.peer or r.node or ("upstream" if r.remote is not None else "local")
            for r in replicas
            if alias in alias_names(r.alias)
        }
    )
