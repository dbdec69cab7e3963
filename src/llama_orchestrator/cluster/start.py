"""`llama-orch cluster start`: the `ray start` that makes this machine a
cluster's head or one of its nodes, safe by default (pure).

What it always says: token authentication (RAY_AUTH_MODE=token in its
environment; the token itself stays in Ray's own places), no dashboard
(and so no job API), no usage statistics, and the node's llama-orch
resources (`placement.node_resources`): the mark and each card's MiB.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from llama_orchestrator.cluster.placement import node_resources

__all__ = ["ray_start_argv", "START_ENV", "DEFAULT_PORT"]

START_ENV = {"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
DEFAULT_PORT = 6379


def ray_start_argv(
    ray: str,
    *,
    head: bool,
    address: str | None,
    node_name: str,
    ip: str | None,
    port: int,
    cards_mib: Sequence[int],
    instances: bool = True,
    num_cpus: int | None = None,
    block: bool = False,
    temp_dir: str | None = None,
) -> list[str]:
    argv = [ray, "start"]
    if head:
        argv += ["--head", "--port", str(port)]
    else:
        assert address, "a node joins a head's address"
        argv += ["--address", address]
    argv += ["--node-name", node_name]
    if ip:
        argv += ["--node-ip-address", ip]
    if head:  # a node has no dashboard of its own to turn off
        argv.append("--include-dashboard=false")
    argv.append("--disable-usage-stats")
    argv += ["--num-gpus", str(len(cards_mib))]
    if instances:
        argv += ["--resources", json.dumps(node_resources(cards_mib), sort_keys=True)]
    if num_cpus is not None:
        argv += ["--num-cpus", str(num_cpus)]
    if temp_dir:
        argv += ["--temp-dir", temp_dir]
    if block:
        argv.append("--block")
    return argv
