"""Where an instance of a cluster home runs (pure; no Ray here).

Every node that runs llama-orch's instances declares, at `ray start`
(`llama-orch cluster start` writes the flags):

- `llama_orch: 1`, the mark of a node with llama-orch and llama-server on it;
- per card d, `llama_orch_gpu<d>_mib: <its VRAM in MiB>`.

An instance's actor asks Ray for the MiB it needs on each card it takes, so
Ray's ledger keeps two instances from sharing a card beyond its memory,
whoever placed them. A pinned instance (`placement.node`) runs on that node,
on `gpu.device_id` exactly when given; an unpinned one on the node with
room that runs the fewest of ours (then the most free VRAM, then the name).
Ray's own "GPU" resource is not used: it counts whole cards and renumbers
them at each start, while an instance pinned to card 1 must stay on card 1.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from llama_orchestrator.config.fit import GPU_BACKENDS
from llama_orchestrator.config.instance import InstanceConfig
from llama_orchestrator.errors import NotYet, UserError

__all__ = [
    "MARKER",
    "ACTOR_PREFIX",
    "card_resource",
    "Card",
    "Node",
    "Need",
    "Placement",
    "need_of",
    "nodes_of",
    "place",
    "check_pin",
    "place_script",
    "cards_in_use",
    "node_resources",
]

MARKER = "llama_orch"
ACTOR_PREFIX = "instance:"
_CARD = re.compile(r"^llama_orch_gpu(\d+)_mib$")
#: what each actor takes of the marker: any number of instances fit on a node
_MARK_SHARE = 0.001


def card_resource(device: int) -> str:
    return f"llama_orch_gpu{device}_mib"


def node_resources(cards_mib: Iterable[int]) -> dict[str, float]:
    """The custom resources a node declares at `ray start --resources`."""
    out: dict[str, float] = {MARKER: 1.0}
    for d, mib in enumerate(cards_mib):
        out[card_resource(d)] = float(mib)
    return out


@dataclass(frozen=True)
class Card:
    index: int
    total_mib: int
    free_mib: int


@dataclass(frozen=True)
class Node:
    id: str
    name: str
    ip: str
    alive: bool
    ours: bool  # it declares the marker
    cards: tuple[Card, ...] = ()
    port: int = 0  # its raylet's, which the daemon connects to to tell it is reachable

    def card(self, index: int) -> Card | None:
        return next((c for c in self.cards if c.index == index), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "ip": self.ip,
            "alive": self.alive,
            "llama_orch": self.ours,
            "cards": [
                {"index": c.index, "total_mib": c.total_mib, "free_mib": c.free_mib}
                for c in self.cards
            ],
        }


def nodes_of(
    ray_nodes: Iterable[Mapping[str, Any]], available: Mapping[str, Mapping[str, float]]
) -> list[Node]:
    """Nodes from Ray's `ray.nodes()` and its per-node available resources,
    one per name (the live one of a node that rejoined)."""
    out = []
    for n in ray_nodes:
        total = n.get("Resources") or {}
        free = available.get(n["NodeID"], {}) if n.get("Alive") else {}
        cards = []
        for key, mib in total.items():
            m = _CARD.match(key)
            if m:
                cards.append(Card(int(m.group(1)), int(mib), int(free.get(key, 0))))
        out.append(
            Node(
                id=n["NodeID"],
                name=n.get("NodeName") or n.get("NodeManagerAddress", ""),
                ip=n.get("NodeManagerAddress", ""),
                alive=bool(n.get("Alive")),
                ours=MARKER in total,
                cards=tuple(sorted(cards, key=lambda c: c.index)),
                port=int(n.get("NodeManagerPort") or 0),
            )
        )
    # a node that rejoined is a new node of the same name: the live one stands for it
    by_name: dict[str, Node] = {}
    for node in out:
        if node.alive or node.name not in by_name:
            by_name[node.name] = node
    return sorted(by_name.values(), key=lambda x: x.name)


@dataclass(frozen=True)
class Need:
    """What an instance asks of a node."""

    node: str | None  # placement.node: this node and no other
    devices: tuple[int, ...]  # these cards exactly (only with `node`)
    count: int  # cards it takes (0: a cpu instance)
    mib: int  # on each card

    @property
    def pinned(self) -> bool:
        return self.node is not None


def need_of(cfg: InstanceConfig, mib_per_card: int) -> Need:
    """The instance's ask: `mib_per_card` is its VRAM on each card it takes
    (`gpu.vram_mib`, else the estimate from the model file)."""
    node = cfg.placement.node if cfg.placement else None
    g = cfg.gpu
    if g.backend not in GPU_BACKENDS:
        return Need(node, (), 0, 0)
    devices = tuple(g.devices)
    count = max(1, len(devices))
    return Need(node, devices if node else (), count, max(1, mib_per_card))


@dataclass(frozen=True)
class Placement:
    node: Node
    devices: tuple[int, ...]
    resources: dict[str, float] = field(default_factory=dict)  # the actor's ask


def _ask(devices: Iterable[int], mib: int) -> dict[str, float]:
    return {MARKER: _MARK_SHARE, **{card_resource(d): float(mib) for d in devices}}


def check_pin(name: str, need: Need, nodes: list[Node]) -> None:
    """Refuse (UserError) a pin that no state of the cluster can satisfy:
    a node it does not have, or cards that node lacks."""
    if need.node is None:
        return
    node = next((n for n in nodes if n.name == need.node and n.ours), None)
    if node is None:
        known = ", ".join(sorted({n.name for n in nodes if n.ours})) or "none"
        raise UserError(
            f"Instance '{name}' is pinned to node '{need.node}', which is not a llama-orch node "
            f"of the cluster (its nodes: {known}).",
            hint="Fix placement.node in its config.json, or start that node with "
            "`llama-orch cluster start`.",
        )
    for d in need.devices:
        card = node.card(d)
        if card is None:
            raise UserError(
                f"Instance '{name}' is pinned to GPU {d} of node '{node.name}', which declares "
                f"{len(node.cards)} card(s).",
                hint="Fix gpu.device_id in its config.json.",
            )
        if card.total_mib < need.mib:
            raise UserError(
                f"Instance '{name}' needs {need.mib} MiB on GPU {d} of node '{node.name}', "
                f"which has {card.total_mib} MiB in all.",
                hint="Lower gpu.layers or model.context_size, or pin it to a bigger card.",
            )


def _free_cards(node: Node, need: Need) -> tuple[int, ...] | None:
    """The cards of `node` the instance would take now (None: no room)."""
    if need.count == 0:
        return ()
    if need.devices:
        ok = all((c := node.card(d)) is not None and c.free_mib >= need.mib for d in need.devices)
        return need.devices if ok else None
    fit = sorted((c for c in node.cards if c.free_mib >= need.mib), key=lambda c: -c.free_mib)
    if len(fit) < need.count:
        return None
    return tuple(sorted(c.index for c in fit[: need.count]))


def place(
    name: str,
    need: Need,
    nodes: list[Node],
    lost: Iterable[str],
    running: Mapping[str, int],
    port: int | None = None,
    ports: Mapping[str, Iterable[int]] | None = None,
) -> Placement:
    """The node and cards for `name` now. `lost`: node names that stopped
    answering (Ray may not know yet); `running`: our instances per node;
    `ports`: the ports our other instances hold per node, where one that
    listens on `port` cannot go.

    Raises UserError for a pin no state satisfies, NotYet when the cluster
    has no room now (or a pinned instance's node is lost)."""
    check_pin(name, need, nodes)
    lost = set(lost)
    taken = {n for n, held in (ports or {}).items() if port is not None and port in held}
    if need.node is not None:
        node = next(n for n in nodes if n.name == need.node and n.ours)
        if not node.alive or node.name in lost:
            raise NotYet(
                f"Instance '{name}' is pinned to node '{node.name}', which is lost; "
                "it starts there once the node is back.",
                retry_s=2.0,
            )
        if node.name in taken:
            raise NotYet(
                f"Instance '{name}' listens on port {port}, which another instance holds on "
                f"node '{node.name}'; it starts there once the port is free.",
                retry_s=5.0,
            )
        devices = _free_cards(node, need)
        if devices is None:
            raise NotYet(
                f"Instance '{name}' needs {need.mib} MiB on GPU {_cards(need)} of node "
                f"'{node.name}', which has no such room now; it starts once it has.",
                retry_s=5.0,
            )
        return Placement(node, devices, _ask(devices, need.mib))
    ranked = []
    for node in nodes:
        if not (node.ours and node.alive) or node.name in lost or node.name in taken:
            continue
        devices = _free_cards(node, need)
        if devices is not None:
            free = sum(c.free_mib for c in node.cards if c.index in devices)
            ranked.append(((running.get(node.name, 0), -free, node.name), node, devices))
    if not ranked:
        what = f"{need.count} card(s) with {need.mib} MiB free" if need.count else "room"
        up = [n.name for n in nodes if n.ours and n.alive and n.name not in lost]
        port_note = f", and port {port} free" if taken else ""
        raise NotYet(
            f"No node of the cluster has {what}{port_note} for instance '{name}' now "
            f"(nodes up: {', '.join(up) or 'none'}); it starts once one has.",
            retry_s=5.0,
        )
    _, node, devices = min(ranked, key=lambda r: r[0])
    return Placement(node, devices, _ask(devices, need.mib))


def place_script(
    name: str,
    want: int | tuple[int, ...],
    vram_mib: int | None,
    nodes: list[Node],
    lost: Iterable[str],
    taken: Iterable[tuple[str, int]] = (),
) -> Placement:
    """The node and cards for a plan's script task: `want` cards (a count,
    or these indices), each wholly free (a lease: no instance beside it),
    or with `vram_mib` free when the task says what it needs. `taken`:
    (node, card) pairs other tasks hold already. Raises NotYet (none now)."""
    lost, taken = set(lost), set(taken)
    ranked = []
    for node in nodes:
        if not (node.ours and node.alive) or node.name in lost:
            continue
        fit = [
            c
            for c in node.cards
            if (node.name, c.index) not in taken
            and (c.free_mib >= vram_mib if vram_mib else c.free_mib == c.total_mib)
            and (not isinstance(want, tuple) or c.index in want)
        ]
        count = len(want) if isinstance(want, tuple) else want
        if len(fit) >= count:
            cards = sorted(fit, key=lambda c: (-c.free_mib, c.index))[:count]
            ranked.append(((-sum(c.free_mib for c in cards), node.name), node, cards))
    if not ranked:
        what = "free card(s)" if not vram_mib else f"card(s) with {vram_mib} MiB free"
        raise NotYet(f"no node has the {what} that task '{name}' asks for now")
    _, node, cards = min(ranked, key=lambda r: r[0])
    asks = {MARKER: _MARK_SHARE}
    for c in cards:
        asks[card_resource(c.index)] = float(vram_mib or c.total_mib)
    return Placement(node, tuple(sorted(c.index for c in cards)), asks)


def cards_in_use(
    nodes: Iterable[Node], running: Iterable[tuple[str, str, Iterable[int]]]
) -> list[dict[str, Any]]:
    """Every card of every llama-orch node, with the instances running on it
    (`running`: (instance, node, cards)), for `gpus --all-nodes`."""
    on: dict[tuple[str, int], list[str]] = {}
    for name, node, cards in running:
        for d in cards:
            on.setdefault((node, d), []).append(name)
    return [
        {
            "node": n.name,
            "ip": n.ip,
            "alive": n.alive,
            "index": c.index,
            "memory_total_mib": c.total_mib,
            "memory_free_mib": c.free_mib,
            "instances": sorted(on.get((n.name, c.index), [])),
        }
        for n in nodes
        if n.ours
        for c in n.cards
    ]


def _cards(need: Need) -> str:
    return ",".join(map(str, need.devices)) or "any"
