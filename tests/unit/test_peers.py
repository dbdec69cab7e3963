"""Peers: what a router tells its peers and what it makes of theirs (pure,
by example), and the daemon's look at a peer against a real router site on
a real socket (its key, its answers, its going away and coming back)."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest

from llama_orchestrator.config.settings import PeerSettings, RouterSettings, Settings
from llama_orchestrator.daemon.board import Board
from llama_orchestrator.daemon.peers import Peers
from llama_orchestrator.hosts.fleet import ask_peers, gather
from llama_orchestrator.router.app import RouterSite
from llama_orchestrator.router.balance import Replica, hosts_of, least_busy
from llama_orchestrator.router.peers import (
    HOP_HEADER,
    PeerInstance,
    names_of,
    parse_state,
    replica_name,
    replicas_of,
    rows_for_peers,
    state_of,
)
from llama_orchestrator.router.proxy import Router
from llama_orchestrator.wire.pool import Pool
from llama_orchestrator.wire.server import Request, serve


def rep(name, alias="m", slots=2, tags=(), **kw):
    return Replica(name, alias, tuple(tags), "127.0.0.1", 8000, slots, **kw)


def test_a_router_tells_its_peers_only_of_its_own_instances():
    replicas = [
        rep("b1", tags=("worker",)),
        rep("b2", slots=4),
        rep("gpt", alias="gpt", remote="gpt-4o"),  # an external upstream: not offered on
        rep("m@c", peer="c"),  # another peer's: one hop at most
    ]
    state = state_of(replicas, {"b1": 1, "m@c": 3})
    assert state["instances"] == [
        {"name": "b1", "alias": "m", "tags": ["worker"], "slots": 2, "in_flight": 1},
        {"name": "b2", "alias": "m", "tags": [], "slots": 4, "in_flight": 0},
    ]
    assert parse_state(state) == [
        PeerInstance("b1", "m", ("worker",), 2, 1),
        PeerInstance("b2", "m", (), 4, 0),
    ]
    for junk in [
        None,
        {},
        {"instances": [{"alias": "m"}]},
        {"instances": [{"name": "x", "alias": "m", "slots": "many"}]},
    ]:
        with pytest.raises(ValueError, match="not a peer state"):
            parse_state(junk)


def test_a_peers_instances_become_one_replica_per_alias_and_tags_as_wide_as_its_free_slots():
    instances = [
        PeerInstance("b1", "m", (), 4, 3),
        PeerInstance("b2", "m", (), 4, 1),
        PeerInstance("w", "small", ("worker", "gpu"), 2, 0),
    ]
    # 4 of the peer's 8 slots are busy, 3 of them with our own requests
    got = replicas_of("b", "http://10.0.0.2:8080", "k", instances, {"m@b": 3})
    assert set(got) == {"m@b", "small[gpu,worker]@b"}
    m = got["m@b"]
    assert (m.host, m.port, m.slots, m.api_key, m.peer, m.tls) == (
        "10.0.0.2",
        8080,
        7,
        "k",
        "b",
        False,
    )
    assert got["small[gpu,worker]@b"].tags == ("gpu", "worker")
    assert replica_name("b", "m", ()) == "m@b"
    # its own clients fill it: one slot is still offered (the peer queues it)
    full = replicas_of("b", "https://b.lan", None, [PeerInstance("b1", "m", (), 2, 9)], {})
    assert full["m@b"].slots == 1 and full["m@b"].port == 443 and full["m@b"].tls
    assert names_of(instances) == {"m", "small", "tags:gpu,worker"}


def test_local_and_peer_replicas_are_weighed_by_the_same_least_busy_rule():
    local = rep("a1", slots=2)
    peer = replicas_of("b", "http://b:8080", None, [PeerInstance("b1", "m", (), 4, 0)], {})["m@b"]
    assert least_busy([local, peer], {"a1": 1}) == peer  # 1/2 busy here vs 0/4 there
    assert least_busy([local, peer], {"a1": 1, "m@b": 3}) == local  # 1/2 < 3/4
    assert hosts_of("m", [local, peer, rep("x", alias="o", remote="o")]) == ["b", "local"]
    assert hosts_of("o", [rep("x", alias="o", remote="o")]) == ["upstream"]


def test_peers_in_the_settings_are_checked():
    s = Settings.model_validate(
        {"peers": [{"name": "rig2", "url": "http://10.0.0.2:8080/", "api_key_file": "k"}]}
    )
    assert s.peers[0].url == "http://10.0.0.2:8080" and s.peers[0].refresh == 1.0
    for bad, says in [
        ({"peers": [{"name": "a", "url": "x"}, {"name": "a", "url": "x"}]}, "http://"),
        ({"peers": [{"name": "a", "url": "http://h"}, {"name": "a", "url": "http://i"}]}, "twice"),
        ({"peers": [{"name": "A B", "url": "http://h"}]}, "pattern"),
        ({"peers": [{"name": "a", "url": "http://h/v1"}]}, "router's http:// address"),
        (
            {"peers": [{"name": "a", "url": "http://h", "api_key_env": "K", "api_key_file": "k"}]},
            "not both",
        ),
    ]:
        with pytest.raises(ValueError, match=says):
            Settings.model_validate(bad)


async def test_a_request_from_a_peer_is_never_sent_on_to_another_peer():
    away = rep("m@c", peer="c")
    router = Router(RouterSettings(queue_timeout=0), lambda: {away.name: away}, lambda: {"m"})
    hop = Request("POST", "/v1/completions", {HOP_HEADER: "1"}, b'{"model": "m"}')
    from llama_orchestrator.router.app import RouterSite

    reply = await RouterSite(router, lambda: (b"", "text/plain")).handle(hop)
    assert reply.status == 503  # only a peer serves it: not here, then
    from llama_orchestrator.router.proxy import _headers_for

    assert _headers_for(away, "application/json")[HOP_HEADER] == "1"
    assert HOP_HEADER not in _headers_for(rep("a1"), "application/json")


# --- the daemon's look at a peer, on a real socket ----------------------------------


@contextlib.asynccontextmanager
async def peer_router(replicas: dict[str, Replica], keys: list[str], rows=None):
    """Router B's site, listening on a free loopback port (its own instances
    are `replicas`, its `ps` rows `rows`; nothing is forwarded in these tests)."""
    router = Router(RouterSettings(api_keys=keys), lambda: replicas, lambda: {"m"})

    async def instances():
        return rows or []

    site = RouterSite(router, lambda: (b"", "text/plain"), instances)
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    task = asyncio.create_task(serve(sock, site))
    try:
        yield port, router
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_the_daemon_publishes_a_peers_replicas_while_it_answers(tmp_path):
    (tmp_path / "b.key").write_text("sekret\n")
    events: list[tuple[str, str]] = []
    board = Board()
    upstream = Pool()
    b_instances = {"b1": rep("b1", slots=4), "b2": rep("b2", alias="other", tags=("worker",))}
    async with peer_router(b_instances, ["sekret"]) as (port, b_router):
        b_router.in_flight["b1"] = 1
        good = PeerSettings(name="b", url=f"http://127.0.0.1:{port}", api_key_file="b.key")
        peers = Peers([good], tmp_path, board, upstream, {}, lambda i, k, m: events.append((k, m)))
        assert await peers.look(good) is None
        assert set(board.replicas) == {"m@b", "other[worker]@b"}
        assert board.replicas["m@b"].slots == 3 and board.replicas["m@b"].api_key == "sekret"
        assert board.peer_known == {"m", "other", "tags:worker"}
        assert peers.states["b"].instances[0]["name"] == "b1"

        # a key it does not know: refused, and off the board
        (tmp_path / "b.key").write_text("wrong")
        why = await peers.look(good)
        assert why is not None and "HTTP 401" in why and "router.api_keys" in why
        assert board.replicas == {}
        assert board.peer_known == {"m", "other", "tags:worker"}  # 503 meanwhile, not 404
        (tmp_path / "b.key").write_text("sekret")
        assert await peers.look(good) is None and len(board.replicas) == 2

        # an instance there stops: its replica goes
        del b_instances["b2"]
        assert await peers.look(good) is None and set(board.replicas) == {"m@b"}
    # the peer is gone
    why = await peers.look(good)
    assert why is not None and ("Connection" in why or "refused" in why), why
    assert board.replicas == {}
    missing = PeerSettings(name="b", url="http://127.0.0.1:9", api_key_file="nokey")
    why = await Peers([missing], tmp_path, board, upstream, {}, lambda *a: None).look(missing)
    assert why is not None and "cannot be read" in why
    upstream.close()


async def test_a_peer_that_stops_answering_fails_the_requests_waiting_there(tmp_path):
    """A silent peer (a cut link: no RST, no answer) is dropped within its
    timeout, with the connections to it, so the requests waiting on them
    fail now (and are retried elsewhere) rather than hang."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader, writer):
        accepted.append(writer)
        await asyncio.sleep(3600)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    upstream = Pool()
    waiting = asyncio.create_task(
        upstream.open("127.0.0.1", port, "POST", "/v1/completions", {}, b"{}")
    )
    peer = PeerSettings(name="b", url=f"http://127.0.0.1:{port}", timeout=0.2)
    board = Board()
    board.publish("m@b", rep("m@b", peer="b"))
    peers = Peers([peer], tmp_path, board, upstream, {}, lambda *a: None)
    peers._published["b"] = {"m@b"}
    why = await peers.look(peer)
    assert why == "no answer within 0.2s"
    assert board.replicas == {}
    from llama_orchestrator.wire.pool import PoolError

    with pytest.raises(PoolError) as exc:
        await asyncio.wait_for(waiting, 5)
    assert exc.value.delivered and not exc.value.answered  # so: retried once elsewhere
    for w in accepted:
        w.close()
    server.close()
    upstream.close()


# --- ps --all-hosts: every peer's rows, asked of its router ----------------------


def test_a_peer_is_shown_its_rows_without_a_servers_log():
    rows = [
        {"name": "b1", "state": "healthy", "last_exit": None},
        {"name": "b2", "state": "exited", "last_exit": {"code": 1, "stderr_tail": ["key=sk-x"]}},
    ]
    told = rows_for_peers(rows)
    assert told["instances"][0] == rows[0]
    assert told["instances"][1]["last_exit"] == {"code": 1}
    assert rows[1]["last_exit"]["stderr_tail"] == ["key=sk-x"]  # ours are left as they were


def test_the_fleet_is_this_machine_first_then_each_peer_or_why_not():
    fleet = gather(
        [{"name": "a1"}],
        {"b": [{"name": "b1"}, {"name": "b2"}], "c": "http://c does not answer"},
    )
    assert [(r["machine"], r["name"]) for r in fleet.rows] == [
        (None, "a1"),
        ("b", "b1"),
        ("b", "b2"),
    ]
    assert fleet.unreached == {"c": "http://c does not answer"}


async def test_every_peers_rows_are_asked_of_its_router_with_its_key(tmp_path):
    (tmp_path / "b.key").write_text("sekret\n")
    (tmp_path / "c.key").write_text("wrong")
    rows = [{"name": "b1", "state": "healthy", "port": 8001}]
    async with peer_router({}, ["sekret"], rows) as (port, _):
        url = f"http://127.0.0.1:{port}"
        peers = [
            PeerSettings(name="b", url=url, api_key_file="b.key"),
            PeerSettings(name="c", url=url, api_key_file="c.key"),
            PeerSettings(name="d", url=url, api_key_file="missing.key"),
            PeerSettings(name="e", url=url),  # no key: refused, as any client without one
        ]
        answers = await ask_peers(peers, tmp_path)
    assert answers["b"] == rows
    assert "refused this machine's key" in answers["c"]
    assert "cannot be read" in answers["d"]
    assert "refused this machine's key" in answers["e"]
    gone = await ask_peers([PeerSettings(name="b", url=url, api_key_file="b.key")], tmp_path)
    assert "does not answer" in gone["b"]


async def test_a_peer_that_is_no_llama_orch_router_is_said_so(tmp_path):
    async def answering(status: str, body: bytes) -> asyncio.Server:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
            writer.close()

        return await asyncio.start_server(answer, "127.0.0.1", 0)

    old = await answering("404 Not Found", b'{"error": "not found"}')  # another program
    odd = await answering("200 OK", b'{"something": "else"}')
    url = "http://127.0.0.1:{}".format
    peers = [
        PeerSettings(name="x", url=url(old.sockets[0].getsockname()[1])),
        PeerSettings(name="y", url=url(odd.sockets[0].getsockname()[1])),
    ]
    try:
        answers = await ask_peers(peers, tmp_path)
    finally:
        old.close()
        odd.close()
    assert "HTTP 404" in answers["x"] and "of this version" in answers["x"]
    assert "no list of instances" in answers["y"]
