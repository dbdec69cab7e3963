"""A cluster home on a real Ray cluster (tests/raycluster.py): the head in
this namespace, nodes n1 and n2 in network namespaces with two fake 6 GiB
cards each, every one started by `llama-orch cluster start` with token
auth; real llama-servers on the tiny model, placed by the daemon on Ray's
ledger, supervised as on one box, and reached through the head's router.

The tests run in order on one cluster (it takes ~10 s to form):
placement, a killed server, a cut node, the node back, and the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import psutil
import pytest

from llama_orchestrator.home import Home
from tests.helpers import wait_until, write_config
from tests.raycluster import RayCluster, why_not

pytestmark = pytest.mark.skipif(why_not() is not None, reason=str(why_not()))

MIB_PIN = 2000  # each pinned instance's VRAM (gpu.vram_mib)
MIB_FREE = 4000  # the unpinned one's: a card of its own


class Rig:
    def __init__(self, cluster: RayCluster, home: Home, router: int) -> None:
        self.cluster, self.home, self.router = cluster, home, router

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "llama_orchestrator", "--home", str(self.home.root), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.cluster.env,
        )

    def ps(self) -> dict[str, dict[str, Any]]:
        r = self.cli("ps", "--json")
        assert r.returncode == 0, r.stderr
        return {x["name"]: x for x in json.loads(r.stdout)}

    def diagnosis(self) -> str:
        """What the daemon saw, for a failure's message."""
        events = self.cli("events").stdout[-6000:]
        log = (self.home.root / "logs" / "daemon.log").read_text()[-4000:]
        return f"ps: {self.ps()}\n--- events\n{events}\n--- daemon.log\n{log}"

    def servers(self, name: str) -> list[psutil.Process]:
        """The live llama-server processes of instance `name`, on any node."""
        out = []
        for p in self.cluster.processes():
            try:
                if p.environ().get("LLAMA_ORCH_INSTANCE") == name and p.status() != "zombie":
                    out.append(p)
            except psutil.Error:
                continue
        return out


@pytest.fixture(scope="module")
def rig(tmp_path_factory, tiny_model, server_bin):
    base = tmp_path_factory.mktemp("cluster")
    cluster = RayCluster(base / "ray")
    home = Home(base / "home")
    home.instances_dir.mkdir(parents=True)
    router = 20000 + os.getpid() % 20000 + 1
    (home.root / "llama-orch.json").write_text(
        json.dumps(
            {"cluster": {"address": cluster.address, "node_timeout": 2}, "router": {"port": router}}
        )
    )
    fast = {
        "healthcheck": {"interval": 0.5, "timeout": 1, "retries": 2, "start_period": 30},
        "restart_policy": {"backoff_initial": 0.2, "backoff_max": 1},
    }
    gpu = {"backend": "cuda", "vram_mib": MIB_PIN}
    write_config(
        home, "pin1", tiny_model, placement={"node": "n1"}, gpu={**gpu, "device_id": 1}, **fast
    )
    write_config(
        home, "pin2", tiny_model, placement={"node": "n2"}, gpu={**gpu, "device_id": 0}, **fast
    )
    write_config(home, "free", tiny_model, gpu={"backend": "cuda", "vram_mib": MIB_FREE}, **fast)
    # on pin2's port: the node with fewer of ours (n2) is not where it can listen
    port = json.loads(home.config_path("pin2").read_text())["server"]["port"]
    write_config(home, "twin", tiny_model, server={"port": port, "parallel": 1}, **fast)
    rig = Rig(cluster, home, router)
    try:
        cluster.start_head()
        cluster.add_node("n1", [6144, 6144])
        cluster.add_node("n2", [6144, 6144])
        cluster.wait_nodes(home.root, 3)
        yield rig
    finally:
        rig.cli("down", "--all", timeout=60)
        rig.cli("daemon", "stop", timeout=60)
        left = [p for p in cluster.processes() if "llama-server" in " ".join(p.cmdline())]
        cluster.close()
        assert not left, f"servers left running after down: {left}"


def test_instances_are_placed_on_nodes_with_room_and_pinned_to_their_cards(rig):
    r = rig.cli("up", "pin1", "pin2", "free", "twin", "--timeout", "120")
    assert r.returncode == 0, r.stdout + r.stderr
    seen = rig.ps()
    assert {n: (s["state"], s["node"]) for n, s in seen.items()} == {
        "pin1": ("healthy", "n1"),
        "pin2": ("healthy", "n2"),
        # the nodes run one of ours each: the one with the most free VRAM on a
        # card, a tie, goes by name
        "free": ("healthy", "n1"),
        "twin": ("healthy", "n1"),  # n2 runs fewer, but pin2 holds its port there
    }
    assert seen["pin1"]["gpu_devices"] == [1] and seen["pin2"]["gpu_devices"] == [0]
    assert seen["free"]["gpu_devices"] == [0]  # card 1 of n1 holds pin1: it has less room
    assert seen["free"]["host"] == rig.cluster.nodes["n1"].addr
    for name, card in (("pin1", "1"), ("pin2", "0"), ("free", "0")):
        (proc,) = rig.servers(name)
        env = proc.environ()
        assert env["CUDA_VISIBLE_DEVICES"] == card
        assert not any(k.startswith("RAY_") for k in env), "the cluster's token reached a server"
    # Ray's ledger holds what each took, per card
    status = json.loads(rig.cli("cluster", "status", "--json").stdout)
    cards = {n["name"]: {c["index"]: c["free_mib"] for c in n["cards"]} for n in status["nodes"]}
    assert cards["n1"] == {0: 6144 - MIB_FREE, 1: 6144 - MIB_PIN}
    assert cards["n2"] == {0: 6144 - MIB_PIN, 1: 6144}
    assert sorted(next(n for n in status["nodes"] if n["name"] == "n1")["instances"]) == [
        "free",
        "pin1",
        "twin",
    ]
    # and `gpus --all-nodes`, card by card
    r = rig.cli("gpus", "--all-nodes", "--json")
    assert r.returncode == 0, r.stderr
    held = {
        (c["node"], c["index"]): (c["memory_free_mib"], c["instances"])
        for c in json.loads(r.stdout)
    }
    assert held[("n1", 0)] == (6144 - MIB_FREE, ["free"])
    assert held[("n1", 1)] == (6144 - MIB_PIN, ["pin1"])
    assert held[("n2", 1)] == (6144, [])
    # a node's server logs read as a local one's
    logs = rig.cli("logs", "free", "--tail", "200")
    node_ip, port = rig.cluster.nodes["n1"].addr, seen["free"]["port"]
    assert f"listening on http://{node_ip}:{port}" in logs.stdout + logs.stderr


def test_nothing_started_exposes_rays_dashboard_or_job_api(rig):
    """`cluster start` turns the dashboard off, so no job API either: neither
    the dashboard's port (8265) nor its agent's (52365) answers anywhere."""
    import socket

    addresses = [rig.cluster.head_ip, *(h.addr for h in rig.cluster.nodes.values())]
    for addr in addresses:
        for port in (8265, 52365):
            with socket.socket() as s, pytest.raises(OSError):
                s.settimeout(2)
                s.connect((addr, port))


def test_the_router_serves_every_model_across_nodes(rig):
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{rig.router}/v1", api_key="none", max_retries=0)
    listed = {m.id: m for m in client.models.list().data}
    assert set(listed) == {"pin1", "pin2", "free", "twin"}
    assert listed["pin2"].model_extra["hosts"] == ["n2"]
    for model in ("pin1", "pin2", "free"):
        out = client.completions.create(model=model, prompt="hello", max_tokens=4)
        assert out.choices[0].text is not None and out.usage.completion_tokens > 0


def test_a_killed_server_is_restarted_on_its_node(rig):
    (proc,) = rig.servers("pin2")
    os.kill(proc.pid, signal.SIGKILL)
    after = wait_until(
        lambda: (s := rig.ps()["pin2"])["state"] == "healthy" and s["pid"] != proc.pid and s,
        timeout=60,
        interval=0.2,
    )
    assert after["node"] == "n2" and after["restarts"] == 1
    assert after["last_exit"]["signal"] == signal.SIGKILL
    assert len(rig.servers("pin2")) == 1


def test_a_killed_daemon_is_replaced_and_takes_over_every_node_server(rig):
    before = {n: s["pid"] for n, s in rig.ps().items()}
    daemon = json.loads((rig.home.root / "state" / "daemon.json").read_text())["pid"]
    os.kill(daemon, signal.SIGKILL)
    wait_until(lambda: not psutil.pid_exists(daemon) or psutil.Process(daemon).status() == "zombie")
    r = rig.cli("daemon", "start")
    assert r.returncode == 0, r.stderr
    after = wait_until(
        lambda: (s := rig.ps()) and all(x["state"] == "healthy" for x in s.values()) and s,
        timeout=30,
    )
    assert {n: s["pid"] for n, s in after.items()} == before  # adopted, not started again
    assert all(len(rig.servers(n)) == 1 for n in before)
    assert "adopted" in rig.cli("events", "free").stdout


def test_a_cut_node_moves_its_unpinned_instance_and_its_pinned_one_waits(rig):
    (old_free,) = rig.servers("free")
    rig.cluster.cut("n1")
    t0 = time.monotonic()
    # the router stops choosing n1's replicas within its health window
    wait_until(lambda: rig.ps()["free"]["state"] != "healthy", timeout=15, interval=0.1)
    gone_after = time.monotonic() - t0
    moved = wait_until(
        lambda: (s := rig.ps()["free"])["state"] == "healthy" and s["node"] == "n2" and s,
        timeout=60,
        interval=0.2,
    )
    assert moved["gpu_devices"] == [1]  # n2's free card
    pin1 = wait_until(lambda: (s := rig.ps()["pin1"])["state"] == "backoff" and s, timeout=30)
    assert pin1["node"] == "n1"
    said = rig.cli("events", "pin1").stdout
    assert "pinned to node 'n1', which is lost" in said
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{rig.router}/v1", api_key="none", max_retries=0)
    out = client.completions.create(model="free", prompt="hi", max_tokens=2)
    assert out.usage.completion_tokens > 0
    assert gone_after < 15
    # --- the node comes back ---------------------------------------------------
    rig.cluster.restore("n1")
    try:
        wait_until(
            lambda: (s := rig.ps()["pin1"])["state"] == "healthy" and s["node"] == "n1",
            timeout=90,
            interval=0.3,
        )
    except AssertionError:
        raise AssertionError(rig.diagnosis()) from None
    # no duplicate: free's old server on n1 stopped itself (the actor's fence)
    wait_until(lambda: not old_free.is_running() or old_free.status() == "zombie", timeout=30)
    assert len(rig.servers("free")) == 1
    assert len(rig.servers("pin1")) == 1
    assert rig.ps()["free"]["node"] == "n2"


def test_down_stops_every_server_on_every_node_and_frees_the_cards(rig):
    r = rig.cli("down", "--all")
    assert r.returncode == 0, r.stderr
    for name in ("pin1", "pin2", "free", "twin"):
        assert rig.servers(name) == []
    status = json.loads(rig.cli("cluster", "status", "--json").stdout)
    for node in status["nodes"]:
        for card in node["cards"]:
            assert card["free_mib"] == card["total_mib"], node


def test_a_script_task_runs_on_a_node_with_free_cards_and_holds_them(rig, tmp_path):
    # after the last test: nothing runs; pin2 takes part of n2's card 0 again
    r = rig.cli("up", "pin2")
    assert r.returncode == 0, r.stderr
    show = "import os, socket; print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ.get('RAY_AUTH_TOKEN'))"
    plan = tmp_path / "plan.json"
    plan.write_text(
        json.dumps(
            {"tasks": [{"id": "train", "kind": "script", "gpus": 2, "timeout": 120,
                        "command": [sys.executable, "-c", show]}]}
        )
    )  # fmt: skip
    r = rig.cli("plan", "run", str(plan), "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    run_id = r.stdout.split()[0]
    (task,) = json.loads(rig.cli("plan", "status", run_id, "--json").stdout)["tasks"]
    # n2 has one wholly free card: only n1 has two
    assert (task["state"], task["instance"]) == ("completed", "n1:gpu0,1")
    (out_file,) = (rig.home.root / "plans" / run_id).rglob("train.out")
    out = out_file.read_text()
    assert out.split() == ["0,1", "None"]  # its cards, and not the cluster's token
    # a task no node can ever hold is refused at once, naming it
    plan.write_text(
        json.dumps({"tasks": [{"id": "huge", "kind": "script", "gpus": 3, "command": ["true"]}]})
    )
    r = rig.cli("plan", "run", str(plan))
    assert r.returncode == 2 and "no node of the cluster has 3 card(s)" in r.stderr
    rig.cli("down", "pin2")


def test_a_pin_to_a_node_the_cluster_lacks_is_refused_and_nothing_starts(rig, tiny_model):
    write_config(rig.home, "lost", tiny_model, placement={"node": "rig9"})
    try:
        r = rig.cli("up", "lost")
        assert r.returncode == 2, r.stdout + r.stderr
        assert "pinned to node 'rig9', which is not a llama-orch node of the cluster" in r.stderr
        assert "Traceback" not in r.stderr
        assert rig.ps()["lost"]["state"] == "created"
    finally:
        rig.cli("rm", "lost")


def test_a_killed_actor_or_node_leaves_no_server_behind(rig):
    """The servers die with what runs them (PR_SET_PDEATHSIG): a killed actor
    takes its server with it, and the daemon starts the instance again; a
    node whose Ray is killed outright leaves no server running. Last: n2 is
    gone for good afterwards."""
    r = rig.cli("up", "pin2")
    assert r.returncode == 0, r.stderr
    (server,) = rig.servers("pin2")
    actor = server.parent()
    assert "InstanceHost" in " ".join(actor.cmdline())
    actor.kill()
    wait_until(lambda: not server.is_running() or server.status() == "zombie", timeout=15)
    again = wait_until(
        lambda: (s := rig.ps()["pin2"])["state"] == "healthy" and s["pid"] != server.pid and s,
        timeout=60,
        interval=0.2,
    )
    assert again["node"] == "n2" and len(rig.servers("pin2")) == 1
    (server,) = rig.servers("pin2")
    ns = rig.cluster.nodes["n2"].ns
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    for pid in map(int, pids.split()):
        if pid != server.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not server.is_running() or server.status() == "zombie", timeout=30)
    assert rig.servers("pin2") == []


def test_bad_cluster_settings_are_one_sentence_errors(tmp_path, tiny_model):
    home = Home(tmp_path / "home")
    write_config(home, "a", tiny_model)
    settings = home.root / "llama-orch.json"
    env = {**os.environ, "RAY_AUTH_TOKEN": "x" * 32}

    def up(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "llama_orchestrator", "--home", str(home.root), "up", "a"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )

    settings.write_text(json.dumps({"cluster": {"address": "not-an-address"}}))
    r = up(env)
    assert r.returncode == 2 and "cluster.address" in r.stderr and "Traceback" not in r.stderr

    settings.write_text(json.dumps({"cluster": {"address": "127.0.0.1:9"}}))  # nothing listens
    r = up(env)
    assert r.returncode == 1 and "does not answer" in r.stderr and "Traceback" not in r.stderr
    assert not (home.root / "state" / "daemon.json").exists()

    no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH_TOKEN")}
    no_token["HOME"] = str(tmp_path)  # and no ~/.ray/auth_token
    r = up(no_token)
    assert r.returncode == 2 and "No Ray token is set" in r.stderr
