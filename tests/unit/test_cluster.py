"""The pure parts of a cluster home: placement on Ray's ledger, the `ray
start` a node runs, the KubeRay manifest (checked against KubeRay's own
CRD schema and Kubernetes' schemas), and the token and error rules of the
adapter. The real cluster: tests/integration/test_cluster.py."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from llama_orchestrator.cluster.placement import (
    MARKER,
    Card,
    Need,
    Node,
    card_resource,
    need_of,
    nodes_of,
    place,
)
from llama_orchestrator.cluster.start import START_ENV, ray_start_argv
from llama_orchestrator.config.instance import InstanceConfig
from llama_orchestrator.errors import NotYet, OrchError, UserError

GOLDEN = Path(__file__).parent.parent / "golden" / "kuberay"


def node(name: str, *free: int, total: int = 6144, alive: bool = True, ours: bool = True) -> Node:
    cards = tuple(Card(i, total, f) for i, f in enumerate(free))
    return Node(f"id-{name}", name, f"10.0.0.{len(name)}", alive, ours, cards)


def cfg(**over) -> InstanceConfig:
    base = {"model": {"path": "m.gguf"}, "server": {"port": 9000}}
    return InstanceConfig.model_validate({**base, **over})


# --- what an instance asks ---------------------------------------------------


def test_a_cpu_instance_asks_for_no_card_and_a_gpu_one_for_its_cards():
    assert need_of(cfg(), 500) == Need(None, (), 0, 0)
    assert need_of(cfg(gpu={"backend": "cuda"}), 500) == Need(None, (), 1, 500)
    split = cfg(gpu={"backend": "cuda", "device_id": [0, 1]})
    assert need_of(split, 500) == Need(None, (), 2, 500)  # unpinned: a count, not the ids
    pinned = cfg(gpu={"backend": "rocm", "device_id": [2, 3]}, placement={"node": "rig2"})
    assert need_of(pinned, 700) == Need("rig2", (2, 3), 2, 700)


# --- where it goes -------------------------------------------------------------


def test_an_unpinned_instance_goes_where_the_fewest_of_ours_run_then_most_room():
    nodes = [node("a", 6144, 6144), node("b", 6144), node("c", 1000)]
    need = Need(None, (), 1, 2000)
    assert place("x", need, nodes, (), {"a": 2, "b": 1}).node.name == "b"
    assert place("x", need, nodes, (), {}).node.name == "a"  # a tie in count: a, by name
    # c has too little room on its card, whatever runs elsewhere
    assert place("x", need, nodes, (), {"a": 5, "b": 5}).node.name == "a"


def test_it_takes_the_cards_with_the_most_room_and_asks_ray_for_their_mib():
    where = place("x", Need(None, (), 2, 1500), [node("a", 1000, 3000, 2000)], (), {})
    assert where.devices == (1, 2)
    assert where.resources == {
        MARKER: pytest.approx(0.001),
        card_resource(1): 1500.0,
        card_resource(2): 1500.0,
    }


def test_a_lost_dead_or_foreign_node_is_never_chosen():
    nodes = [node("a", 6144), node("b", 6144, alive=False), node("c", 6144, ours=False)]
    with pytest.raises(NotYet, match="nodes up: none"):
        place("x", Need(None, (), 1, 100), nodes, {"a"}, {})
    assert place("x", Need(None, (), 0, 0), nodes, (), {}).node.name == "a"


def test_a_pinned_instance_runs_on_its_node_and_cards_or_waits_for_them():
    nodes = [node("a", 6144, 500), node("b", 6144)]
    where = place("x", Need("a", (0,), 1, 2000), nodes, (), {"a": 9})
    assert (where.node.name, where.devices) == ("a", (0,))
    with pytest.raises(NotYet, match="which is lost; it starts there once the node is back"):
        place("x", Need("a", (0,), 1, 2000), nodes, {"a"}, {})
    with pytest.raises(NotYet, match="no such room now"):
        place("x", Need("a", (1,), 1, 2000), nodes, (), {})
    # pinned to a node but not to a card: its card with room
    assert place("x", Need("a", (), 1, 2000), nodes, (), {}).devices == (0,)


def test_a_pin_no_state_of_the_cluster_satisfies_is_a_users_error():
    nodes = [node("a", 6144), node("z", 6144, ours=False)]
    with pytest.raises(
        UserError, match=r"node 'rig9', which is not a llama-orch node .*its nodes: a\)"
    ):
        place("x", Need("rig9", (), 0, 0), nodes, (), {})
    with pytest.raises(UserError, match="GPU 3 of node 'a', which declares 1 card"):
        place("x", Need("a", (3,), 1, 10), nodes, (), {})
    with pytest.raises(UserError, match="needs 9000 MiB on GPU 0 of node 'a', which has 6144"):
        place("x", Need("a", (0,), 1, 9000), nodes, (), {})


def test_nodes_are_read_from_rays_ledger_one_per_name():
    ray_nodes = [
        {"NodeID": "old", "NodeName": "n1", "NodeManagerAddress": "10.0.0.2", "Alive": False,
         "NodeManagerPort": 1, "Resources": {MARKER: 1.0, card_resource(0): 6144.0}},
        {"NodeID": "new", "NodeName": "n1", "NodeManagerAddress": "10.0.0.2", "Alive": True,
         "NodeManagerPort": 2, "Resources": {MARKER: 1.0, card_resource(0): 6144.0, card_resource(1): 8192.0, "GPU": 2.0}},
        {"NodeID": "h", "NodeName": "head", "NodeManagerAddress": "10.0.0.1", "Alive": True,
         "Resources": {"CPU": 4.0}},
    ]  # fmt: skip
    available = {"new": {card_resource(0): 2000.0, card_resource(1): 8192.0}, "old": {}}
    (head, n1) = nodes_of(ray_nodes, available)
    assert (head.name, head.ours, head.cards) == ("head", False, ())
    assert (n1.id, n1.port, n1.alive) == ("new", 2, True)  # a node that rejoined: the live one
    assert n1.cards == (Card(0, 6144, 2000), Card(1, 8192, 8192))


# --- the node's `ray start` ------------------------------------------------------


def test_cluster_start_always_asks_for_token_auth_and_no_dashboard():
    head = ray_start_argv(
        "ray", head=True, address=None, node_name="h", ip=None, port=6379, cards_mib=[8192]
    )
    assert head[:5] == ["ray", "start", "--head", "--port", "6379"]
    assert "--include-dashboard=false" in head and "--disable-usage-stats" in head
    assert START_ENV["RAY_AUTH_MODE"] == "token"
    assert json.loads(head[head.index("--resources") + 1]) == {
        MARKER: 1.0,
        card_resource(0): 8192.0,
    }
    assert head[head.index("--num-gpus") + 1] == "1"
    node = ray_start_argv(
        "ray",
        head=False,
        address="h:6379",
        node_name="n",
        ip="10.0.0.2",
        port=0,
        cards_mib=[],
        block=True,
    )
    assert "--include-dashboard=false" not in node  # Ray refuses it on a node
    assert node[-1] == "--block" and node[node.index("--node-ip-address") + 1] == "10.0.0.2"
    coordinator = ray_start_argv(
        "ray",
        head=True,
        address=None,
        node_name="h",
        ip=None,
        port=1,
        cards_mib=[],
        instances=False,
    )
    assert "--resources" not in coordinator  # no llama-orch mark: nothing placed there


def test_cluster_start_refuses_half_a_command(tmp_path):
    from tests.helpers import run_cli

    r = run_cli(tmp_path, "cluster", "start")
    assert r.returncode == 2 and "--head" in r.stderr and "--address" in r.stderr
    r = run_cli(tmp_path, "cluster", "start", "--address", "h:1", "--gpu-mib", "6G", "--dry-run")
    assert r.returncode == 2 and "--gpu-mib" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(
        tmp_path, "cluster", "start", "--address", "h:1", "--gpu-mib", "6144,8192", "--dry-run"
    )
    assert r.returncode == 0 and '"llama_orch_gpu1_mib": 8192' in r.stdout


# --- the adapter's rules ----------------------------------------------------------------


def test_ray_finds_its_token_in_its_own_places_only(tmp_path):
    from llama_orchestrator.cluster.rayclient import token_source

    assert token_source({}, tmp_path) is None
    assert token_source({"RAY_AUTH_TOKEN": "t"}, tmp_path) == "$RAY_AUTH_TOKEN"
    (tmp_path / "tok").write_text("\n")
    assert token_source({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok")}, tmp_path) is None  # empty
    (tmp_path / "tok").write_text("secret\n")
    assert token_source({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok")}, tmp_path).startswith(
        "$RAY_AUTH_TOKEN_PATH"
    )
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("secret")
    assert token_source({}, tmp_path) == str(tmp_path / ".ray" / "auth_token")


def test_joining_errors_are_one_sentence():
    from llama_orchestrator.cluster.rayclient import _reachable, _why_not_joined

    mismatch = RuntimeError(
        "Version mismatch: The cluster was started with:\n    Ray: 2.59.0\n    Python: 3.11.7\n"
        "This process on node 10.0.0.1 was started with:\n    Ray: 2.60.0\n    Python: 3.11.7"
    )
    said = _why_not_joined("h:1", mismatch)
    assert (
        said.startswith("The Ray cluster at h:1 runs another Ray or Python version")
        and "\n" not in said
    )
    assert "refused this machine's token" in _why_not_joined(
        "h:1", RuntimeError("InvalidAuthToken")
    )
    with pytest.raises(OrchError, match=r"127.0.0.1:9 does not answer .*cluster.address"):
        _reachable("127.0.0.1:9", timeout=1)


def test_cluster_settings_are_checked_field_by_field():
    from pydantic import ValidationError

    from llama_orchestrator.config.settings import Settings

    assert Settings.model_validate({"cluster": {"address": "auto"}}).cluster.node_timeout == 5.0
    for bad in (
        {"address": "head"},
        {"address": "h:99999"},
        {"address": "h:1", "namespace": "a b"},
    ):
        with pytest.raises(ValidationError):
            Settings.model_validate({"cluster": bad})


# --- Kubernetes ------------------------------------------------------------------------


def _docs():
    from llama_orchestrator.cluster.kuberay import manifest

    configs = {
        "big": cfg(gpu={"backend": "cuda", "device_id": [0, 1]}),
        "small": cfg(gpu={"backend": "cuda", "device_id": 0}),
        "amd": cfg(gpu={"backend": "rocm"}),
        "tiny": cfg(),
    }
    settings = {"router": {"port": 8080}, "cluster": {"address": "10.0.0.1:6379"}}
    return manifest("My Lab", "registry.example/llama-orch:1", configs, settings, gpu_mib=24576)


def test_the_kuberay_manifest_is_a_valid_raycluster_and_configmap():
    import jsonschema
    import kubernetes_validate

    config_map, ray_cluster = _docs()
    schema = json.loads(gzip.decompress((GOLDEN / "raycluster-v1.schema.json.gz").read_bytes()))
    jsonschema.validate(ray_cluster, schema)  # KubeRay's own CRD schema (see the README there)
    version = kubernetes_validate.latest_version()
    kubernetes_validate.validate(config_map, version, strict=True)
    groups = [ray_cluster["spec"]["headGroupSpec"], *ray_cluster["spec"]["workerGroupSpecs"]]
    for i, group in enumerate(groups):
        pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}"}}
        kubernetes_validate.validate({**pod, "template": group["template"]}, version, strict=True)


def test_the_kuberay_manifest_asks_for_token_auth_and_a_worker_group_per_card_kind():
    from llama_orchestrator.config.settings import Settings

    config_map, ray_cluster = _docs()
    spec = ray_cluster["spec"]
    assert ray_cluster["metadata"]["name"] == "my-lab"
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["headGroupSpec"]["rayStartParams"]["include-dashboard"] == "false"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cuda", "rocm", "cpu"}
    cuda = groups["cuda"]
    assert cuda["replicas"] == 2 and cuda["rayStartParams"]["num-gpus"] == "2"
    assert json.loads(cuda["rayStartParams"]["resources"]) == {
        MARKER: 1.0, card_resource(0): 24576.0, card_resource(1): 24576.0
    }  # fmt: skip
    assert cuda["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert (
        groups["rocm"]["template"]["spec"]["containers"][0]["resources"]["limits"]["amd.com/gpu"]
        == 1
    )
    assert json.loads(groups["cpu"]["rayStartParams"]["resources"]) == {MARKER: 1.0}
    # the home the head's daemon runs: the configs as given, the cluster it is part of
    home = json.loads(config_map["data"]["llama-orch.json"])
    assert Settings.model_validate(home).cluster.address == "auto"
    assert InstanceConfig.model_validate_json(
        config_map["data"]["big.config.json"]
    ).gpu.devices == [0, 1]
    daemon = spec["headGroupSpec"]["template"]["spec"]["containers"][1]
    assert daemon["command"][:4] == ["llama-orch", "--home", "/llama-orch", "daemon"]


def test_cluster_render_kuberay_writes_yaml_of_the_homes_instances(tmp_path, tiny_model):
    import yaml

    from llama_orchestrator.home import Home
    from tests.helpers import run_cli, write_config

    home = Home(tmp_path)
    write_config(home, "a", tiny_model, gpu={"backend": "vulkan", "device_id": 0})
    r = run_cli(home, "cluster", "render", "kuberay", "--image", "img:1")
    assert r.returncode == 0, r.stderr
    config_map, ray_cluster = yaml.safe_load_all(r.stdout)
    assert config_map["kind"] == "ConfigMap" and ray_cluster["kind"] == "RayCluster"
    assert [g["groupName"] for g in ray_cluster["spec"]["workerGroupSpecs"]] == ["vulkan"]
    r = run_cli(home, "cluster", "render", "helm")
    assert r.returncode == 2 and "kuberay" in r.stderr


def test_a_script_task_takes_wholly_free_cards_on_one_node_or_waits():
    from llama_orchestrator.cluster.placement import place_script

    nodes = [node("a", 6144, 2000), node("b", 6144, 6144)]
    where = place_script("t", 2, None, nodes, ())
    assert (where.node.name, where.devices) == ("b", (0, 1))
    assert where.resources[card_resource(0)] == 6144.0  # all of it: nothing beside it
    assert place_script("t", 1, 1500, [node("a", 3000), node("b", 6144)], ()).node.name == "b"
    assert place_script("t", (1,), 1500, nodes, {"b"}).devices == (1,)  # a's card 1 has room
    with pytest.raises(NotYet, match="free card"):
        place_script("t", 2, None, nodes, (), taken={("b", 1)})


def test_a_home_on_a_cluster_is_told_from_its_settings_as_plain_json(tmp_path):
    from llama_orchestrator.home import Home

    home = Home(tmp_path)
    assert not home.on_cluster()  # no llama-orch.json
    for text, expected in (
        ('{"cluster": {"address": "h:1"}}', True),
        ('{"cluster": null}', False),
        ('{"router": {"port": 8080}}', False),
        ("{broken", False),  # said by the commands that read the settings
    ):
        home.settings_path.write_text(text)
        assert home.on_cluster() is expected, text


def test_instances_on_one_port_are_placed_on_different_nodes():
    nodes = [node("a", 6144), node("b", 6144)]
    need = Need(None, (), 0, 0)
    held = {"a": {8001}, "b": {9000}}
    assert place("x", need, nodes, (), {}, 8001, held).node.name == "b"
    assert place("x", need, nodes, (), {}, 8002, held).node.name == "a"
    with pytest.raises(NotYet, match="and port 8001 free"):
        place("x", need, nodes, (), {}, 8001, {"a": {8001}, "b": {8001}})
    with pytest.raises(NotYet, match="port 8001, which another instance holds on node 'a'"):
        place("x", Need("a", (), 0, 0), nodes, (), {}, 8001, held)


def test_on_a_cluster_only_two_instances_pinned_to_one_node_clash_on_a_port(tmp_path, tiny_model):
    from llama_orchestrator.config.validate import load_all
    from llama_orchestrator.home import Home
    from tests.helpers import write_config

    home = Home(tmp_path)
    home.settings_path.write_text('{"cluster": {"address": "h:1"}}')
    for name, where in (("a", None), ("b", None), ("c", "n1"), ("d", "n1")):
        extra = {"placement": {"node": where}} if where else {}
        write_config(home, name, tiny_model, server={"port": 8001}, **extra)
    from llama_orchestrator.config.validate import check_instance

    items = load_all(home)
    clashes = {
        x.name for x in items for p in check_instance(home, x, items) if p.field == "server.port"
    }
    assert clashes == {"c", "d"}  # a and b go where the port is free
