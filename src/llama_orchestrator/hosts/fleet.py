"""Every host's instances, for `ps --all-hosts` and the dashboard: this
machine's, and each peer's (`"peers"` in llama-orch.json) as its own `ps`
shows them, asked of the peer's router (`router.peers.INSTANCES_PATH`) with the
key this machine holds for it, all peers at once.

A peer that does not answer is no error: its rows are missing and the
reason is said (`Fleet.unreached`), as `docker context` would for a host
that is down.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama_orchestrator.config.settings import PeerSettings
from llama_orchestrator.errors import OrchError
from llama_orchestrator.home import Home
from llama_orchestrator.router.peers import INSTANCES_PATH
from llama_orchestrator.wire.pool import Pool, PoolError

__all__ = ["Fleet", "look", "gather", "ask_peer", "ask_peers"]


@dataclass
class Fleet:
    #: every row, each with `machine`: None for this machine, else the peer's name
    rows: list[dict[str, Any]] = field(default_factory=list)
    #: peer name -> why its instances are not listed
    unreached: dict[str, str] = field(default_factory=dict)
    #: how many peers llama-orch.json names
    peers: int = 0


def look(home: Home, local: Sequence[Mapping[str, Any]]) -> Fleet:
    """`local` (this machine's rows) with every peer's, asked now. A broken
    llama-orch.json raises its ConfigError, as everything that reads it does."""
    from llama_orchestrator.config.parse import load_settings

    peers = load_settings(home.settings_path).peers
    fleet = gather(local, asyncio.run(ask_peers(peers, home.root)) if peers else {})
    fleet.peers = len(peers)
    return fleet


def gather(
    local: Sequence[Mapping[str, Any]],
    answers: Mapping[str, list[dict[str, Any]] | str],
) -> Fleet:
    """This machine's rows first, then each peer's in the order given (pure)."""
    fleet = Fleet([{**r, "machine": None} for r in local])
    for name, answer in answers.items():
        if isinstance(answer, str):
            fleet.unreached[name] = answer
        else:
            fleet.rows += [{**r, "machine": name} for r in answer]
    return fleet


async def ask_peer(pool: Pool, peer: PeerSettings, home_root: Path) -> list[dict[str, Any]] | str:
    """The peer's rows, or why not (one phrase)."""
    from llama_orchestrator.upstreams import read_key

    try:
        key = read_key(f"peer '{peer.name}'", peer.api_key_env, peer.api_key_file, home_root)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        ask = pool.fetch_url(peer.url.rstrip("/") + INSTANCES_PATH, "GET", headers)
        status, body = await asyncio.wait_for(ask, peer.timeout)
    except OrchError as exc:
        return exc.message
    except asyncio.TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
        return f"{peer.url} does not answer (no answer within {peer.timeout:g}s)"
    except PoolError as exc:
        return f"{peer.url} does not answer ({exc})"
    if status == 401:
        return f"{peer.url} refused this machine's key (it is not one of its router.api_keys)"
    if status != 200:
        return f"{peer.url} answered HTTP {status} (is it llama-orch's router, of this version?)"
    try:
        rows = json.loads(body)["instances"]
        if not isinstance(rows, list):
            raise TypeError("instances is not a list")
    except (ValueError, KeyError, TypeError) as exc:
        return f"{peer.url} answered what is no list of instances ({exc})"
    return [r for r in rows if isinstance(r, dict)]


async def ask_peers(
    peers: list[PeerSettings], home_root: Path
) -> dict[str, list[dict[str, Any]] | str]:
    """Every peer's rows (or why not), asked at once."""
    pool = Pool()
    try:
        answers = await asyncio.gather(*(ask_peer(pool, p, home_root) for p in peers))
    finally:
        pool.close()
    return {p.name: a for p, a in zip(peers, answers, strict=True)}
