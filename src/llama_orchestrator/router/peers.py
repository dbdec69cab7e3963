"""Peers: other machines' routers whose models this router serves too
(`"peers"` in llama-orch.json). Pure parts, no I/O; the daemon's loop that
looks at each peer is `daemon.peers`.

Every `refresh` seconds a router asks each peer `GET /v1/peer/state` (with
the key it holds for that peer, which must be one of the peer's
`router.api_keys`): the peer's own healthy instances (never its peers': a
request goes one hop at most), their aliases, tags, slots and requests in
flight. Each (alias, tags) a peer serves becomes one replica here, as wide
as the slots that peer's own clients leave free, and the least-busy rule
then weighs it against the local ones. A request forwarded to a peer
carries `HOP_HEADER`, and a router never sends such a request on to its own
peers (no loops, whatever the configs say).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from llama_orchestrator import __version__
from llama_orchestrator.names import alias_names, tag_model
from llama_orchestrator.router.balance import Replica
from llama_orchestrator.wire.pool import origin

__all__ = [
    "STATE_PATH",
    "INSTANCES_PATH",
    "rows_for_peers",
    "HOP_HEADER",
    "PeerInstance",
    "state_of",
    "parse_state",
    "replicas_of",
    "names_of",
    "replica_name",
]

STATE_PATH = "/v1/peer/state"
#: every instance of the peer as its own `ps --json` shows it (`ps --all-hosts`)
INSTANCES_PATH = "/v1/peer/instances"
#: set on requests a router forwards to a peer: that peer serves them itself
HOP_HEADER = "x-llama-orch-hop"


@dataclass(frozen=True)
class PeerInstance:
    """One healthy instance of a peer, as its router reports it."""

    name: str
    alias: str
    tags: tuple[str, ...]
    slots: int
    in_flight: int


def state_of(replicas: Iterable[Replica], in_flight: Mapping[str, int]) -> dict[str, Any]:
    """What this router tells its peers: its own instances that take
    requests now (not upstreams, not its peers')."""
    return {
        "version": __version__,
        "instances": [
            {
                "name": r.name,
                "alias": r.alias,
                "tags": list(r.tags),
                "slots": r.slots,
                "in_flight": in_flight.get(r.name, 0),
            }
            for r in sorted(replicas, key=lambda r: r.name)
            if r.peer is None and r.remote is None
        ],
    }


def rows_for_peers(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """What `INSTANCES_PATH` answers: this machine's `ps --json` rows, less
    the last exit's stderr lines (a server's log is no business of a peer)."""
    out = []
    for r in rows:
        row = dict(r)
        if isinstance(row.get("last_exit"), dict):
            row["last_exit"] = {k: v for k, v in row["last_exit"].items() if k != "stderr_tail"}
        out.append(row)
    return {"version": __version__, "instances": out}


def parse_state(data: Any) -> list[PeerInstance]:
    """A peer's `state_of`; ValueError when it is not one."""
    try:
        return [
            PeerInstance(
                str(i["name"]),
                str(i["alias"]),
                tuple(str(t) for t in i.get("tags", [])),
                max(1, int(i["slots"])),
                max(0, int(i.get("in_flight", 0))),
            )
            for i in data["instances"]
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a peer state ({type(exc).__name__}: {exc})") from None


def replica_name(peer: str, alias: str, tags: Iterable[str]) -> str:
    """`alias@peer` (with `[tags]` when it has any): '@' is in no instance name."""
    listed = ",".join(sorted(tags))
    return f"{alias}[{listed}]@{peer}" if listed else f"{alias}@{peer}"


def replicas_of(
    peer: str,
    url: str,
    key: str | None,
    instances: Iterable[PeerInstance],
    ours: Mapping[str, int],
) -> dict[str, Replica]:
    """The replicas a peer's state gives, by name: one per (alias, tags) it
    serves, its slots what the peer's own clients leave free (the peer's
    in-flight count includes `ours`, this router's requests there now)."""
    host, port, tls = origin(url)
    groups: dict[tuple[str, tuple[str, ...]], list[PeerInstance]] = {}
    for i in instances:
        groups.setdefault((i.alias, tuple(sorted(i.tags))), []).append(i)
    out = {}
    for (alias, tags), members in sorted(groups.items()):
        name = replica_name(peer, alias, tags)
        others = sum(m.in_flight for m in members) - ours.get(name, 0)
        out[name] = Replica(
            name=name,
            alias=alias,
            tags=tags,
            host=host,
            port=port,
            slots=max(1, sum(m.slots for m in members) - max(0, others)),
            api_key=key,
            tls=tls,
            peer=peer,
        )
    return out


def names_of(instances: Iterable[PeerInstance]) -> set[str]:
    """The model names a peer's instances offer (aliases, `tags:` sets)."""
    names: set[str] = set()
    for i in instances:
        names.update(alias_names(i.alias))
        if i.tags:
            names.add(tag_model(i.tags))
    return names
