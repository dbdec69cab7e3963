"""`llama-orch cluster render kuberay`: the home's instances as a KubeRay
`RayCluster` on a company's Kubernetes (pure).

Two documents: a ConfigMap with the home (llama-orch.json and each
instance's config.json), and the RayCluster:

- token auth on (`authOptions.mode: token`: KubeRay makes the token and
  gives it to every Ray container), no dashboard, no usage statistics;
- the head pod runs Ray's head and, beside it, llama-orch's daemon (and
  its router) on the home from the ConfigMap, `cluster.address: auto`;
- one worker group per kind of card the instances ask for (cuda, rocm,
  vulkan, cpu), as many pods as instances of that kind, each declaring
  the llama-orch resources `cluster start` declares (`placement`), with
  the cards as Kubernetes resources (nvidia.com/gpu, amd.com/gpu).

The image is a parameter: one with llama-orch[ray], a llama-server built
for the cards, and the models (or a volume holding them) at the paths the
configs name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from llama_orchestrator.cluster.placement import node_resources
from llama_orchestrator.config.instance import InstanceConfig

__all__ = ["manifest", "to_yaml", "HOME_MOUNT"]

HOME_MOUNT = "/llama-orch"
#: Kubernetes' resource name for each backend's cards (none: no device plugin asked)
DEVICE_RESOURCE = {"cuda": "nvidia.com/gpu", "rocm": "amd.com/gpu"}


def _dns_name(text: str) -> str:
    name = re.sub(r"[^a-z0-9-]", "-", text.lower()).strip("-")[:50]
    return name or "llama-orch"


def _container(name: str, image: str, resources: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"name": name, "image": image, "resources": resources, **more}


def manifest(
    name: str,
    image: str,
    configs: Mapping[str, InstanceConfig],
    settings: Mapping[str, Any] | None = None,
    *,
    ray_version: str = "2.60.0",
    gpu_mib: int = 24576,
) -> list[dict[str, Any]]:
    """The ConfigMap and the RayCluster (plain data, ready for YAML)."""
    cluster = _dns_name(name)
    home_settings = {
        **dict(settings or {}),
        "cluster": {**dict((settings or {}).get("cluster") or {}), "address": "auto"},
    }
    data = {"llama-orch.json": json.dumps(home_settings, indent=2, sort_keys=True)}
    items = [{"key": "llama-orch.json", "path": "llama-orch.json"}]
    for inst, cfg in sorted(configs.items()):
        key = f"{inst}.config.json"
        data[key] = cfg.model_dump_json(indent=2, exclude_defaults=True)
        items.append({"key": key, "path": f"instances/{inst}/config.json"})
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{cluster}-home"},
        "data": data,
    }
    home_volume = {"name": "home", "configMap": {"name": f"{cluster}-home", "items": items}}
    safe = {"include-dashboard": "false", "disable-usage-stats": "true"}
    head = {
        "rayStartParams": {**safe, "num-gpus": "0"},
        "template": {
            "spec": {
                "containers": [
                    _container(
                        "ray-head",
                        image,
                        {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
                        ports=[{"containerPort": 6379, "name": "gcs"}],
                    ),
                    _container(
                        "llama-orch",
                        image,
                        {"requests": {"cpu": "250m", "memory": "256Mi"}},
                        command=["llama-orch", "--home", HOME_MOUNT, "daemon", "start"],
                        args=["--foreground", "--stop-instances"],
                        ports=[{"containerPort": 8080, "name": "router"}],
                        volumeMounts=[{"name": "home", "mountPath": HOME_MOUNT}],
                    ),
                ],
                "volumes": [home_volume],
            }
        },
    }
    workers = []
    for backend, group in sorted(_groups(configs).items()):
        cards = max(group)
        limits: dict[str, Any] = {"memory": "8Gi"}
        if backend in DEVICE_RESOURCE and cards:
            limits[DEVICE_RESOURCE[backend]] = cards
        workers.append(
            {
                "groupName": backend,
                "replicas": len(group),
                "minReplicas": len(group),
                "maxReplicas": len(group),
                "rayStartParams": {
                    **safe,
                    "num-gpus": str(cards),
                    "resources": json.dumps(node_resources([gpu_mib] * cards), sort_keys=True),
                },
                "template": {
                    "spec": {
                        "containers": [
                            _container(
                                "ray-worker",
                                image,
                                {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": limits},
                            )
                        ]
                    }
                },
            }
        )
    ray_cluster = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": cluster, "labels": {"app.kubernetes.io/managed-by": "llama-orch"}},
        "spec": {
            "rayVersion": ray_version,
            "authOptions": {"mode": "token"},
            "headGroupSpec": head,
            "workerGroupSpecs": workers,
        },
    }
    return [config_map, ray_cluster]


def _groups(configs: Mapping[str, InstanceConfig]) -> dict[str, list[int]]:
    """Per backend, the cards each of its instances takes."""
    out: dict[str, list[int]] = {}
    for cfg in configs.values():
        g = cfg.gpu
        cards = 0 if g.backend in ("cpu", "metal") else max(1, len(g.devices))
        out.setdefault(g.backend if cards else "cpu", []).append(cards)
    return out


def to_yaml(docs: list[dict[str, Any]]) -> str:
    """YAML documents (PyYAML, which Ray brings; else JSON, which YAML reads too)."""
    try:
        import yaml
    except ImportError:
        return "\n---\n".join(json.dumps(d, indent=2) for d in docs) + "\n"
    return yaml.safe_dump_all(docs, sort_keys=False)
