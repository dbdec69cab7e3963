"""The adapter over Ray Core: the only module that imports `ray` (lazily,
from the optional `ray` extra).

Token authentication always: this process sets RAY_AUTH_MODE=token before
Ray is imported, and refuses to connect while none of Ray's own places
holds a token, so neither the daemon nor `cluster start` ever joins or
makes a cluster that any process on the network may use.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Any

from llama_orchestrator.cluster.placement import ACTOR_PREFIX, Node, Placement, nodes_of
from llama_orchestrator.config.settings import ClusterSettings
from llama_orchestrator.errors import OrchError, UserError

__all__ = ["Cluster", "look", "token_source", "require_ray", "preflight", "TOKEN_HINT"]

TOKEN_HINT = (
    "Make a token once (`ray get-auth-token --generate`, which writes ~/.ray/auth_token) "
    "and give every node and this machine the same one, in ~/.ray/auth_token, "
    "$RAY_AUTH_TOKEN or the file named by $RAY_AUTH_TOKEN_PATH."
)


def require_ray() -> Any:
    """The `ray` module, with token auth on; UserError when the extra is missing."""
    os.environ["RAY_AUTH_MODE"] = "token"
    try:
        import ray
    except ImportError:
        raise UserError(
            "This home runs on a Ray cluster (`cluster` in llama-orch.json), and Ray is not "
            "installed here.",
            hint="pip install 'llama-orch[ray]' (on every node too).",
        ) from None
    return ray


def preflight(settings: ClusterSettings) -> None:
    """What can be told before a daemon is started for a cluster home, in
    one sentence each: Ray installed, a token set, the head answering."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        require_ray()  # says how to install it
    if token_source() is None:
        raise UserError(
            "No Ray token is set on this machine, so it joins no cluster.", hint=TOKEN_HINT
        )
    if settings.address != "auto":
        _reachable(settings.address)


def token_source(env: dict[str, str] | None = None, home: Path | None = None) -> str | None:
    """Where Ray will find its token (None: nowhere, so no cluster is joined)."""
    env = dict(os.environ) if env is None else env
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return "$RAY_AUTH_TOKEN"
    path = env.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return f"$RAY_AUTH_TOKEN_PATH ({path})" if _has_text(Path(path)) else None
    default = (home or Path.home()) / ".ray" / "auth_token"
    return str(default) if _has_text(default) else None


def _has_text(path: Path) -> bool:
    try:
        return bool(path.read_text().strip())
    except OSError:
        return False


class Cluster:
    """One connection to the cluster, for one home's namespace."""

    def __init__(self, settings: ClusterSettings, home_root: Path) -> None:
        self.settings = settings
        self.namespace = settings.namespace or _namespace_of(home_root)
        self.ray: Any = None

    # --- connecting ---------------------------------------------------------------

    def connect(self) -> None:
        """Join the cluster as a driver (raises OrchError with one sentence)."""
        if self.ray is not None:
            return
        ray = require_ray()
        if token_source() is None:
            raise UserError(
                "No Ray token is set on this machine, so it joins no cluster.", hint=TOKEN_HINT
            )
        address = self.settings.address
        if address != "auto":
            _reachable(address)
        try:
            ray.init(
                address=address,
                namespace=self.namespace,
                log_to_driver=False,
                logging_level="ERROR",
                configure_logging=False,
                include_dashboard=False,
            )
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError, its own ...
            raise OrchError(_why_not_joined(address, exc)) from None
        self.ray = ray

    def close(self) -> None:
        if self.ray is not None:
            self.ray.shutdown()
            self.ray = None

    # --- the ledger ---------------------------------------------------------------

    def nodes(self) -> list[Node]:
        ray = self.ray
        from ray._private.state import available_resources_per_node

        return nodes_of(ray.nodes(), available_resources_per_node())

    # --- instance actors ------------------------------------------------------------

    def actor(self, name: str) -> Any | None:
        """The live actor of instance `name` (None: none)."""
        try:
            return self.ray.get_actor(ACTOR_PREFIX + name, namespace=self.namespace)
        except ValueError:
            return None

    def create(self, name: str, where: Placement) -> Any:
        """A detached actor for `name` on `where.node`, holding its resources."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from llama_orchestrator.cluster.host import InstanceHost

        remote = self.ray.remote(InstanceHost)
        return remote.options(
            name=ACTOR_PREFIX + name,
            namespace=self.namespace,
            lifetime="detached",
            num_cpus=0,
            resources=where.resources,
            max_restarts=0,
            max_concurrency=16,  # an exit watch blocks one thread for the server's life
            scheduling_strategy=NodeAffinitySchedulingStrategy(where.node.id, soft=False),
        ).remote(name, self.namespace)

    def kill(self, actor: Any) -> None:
        with contextlib.suppress(Exception):  # gone already
            self.ray.kill(actor, no_restart=True)

    def ours(self) -> list[str]:
        """The instance names that have an actor in this namespace."""
        from ray.util import list_named_actors

        return sorted(
            a["name"].removeprefix(ACTOR_PREFIX)
            for a in list_named_actors(all_namespaces=True)
            if a.get("namespace") == self.namespace and a["name"].startswith(ACTOR_PREFIX)
        )


def look(settings: ClusterSettings, home_root: Path) -> tuple[str, list[Node]]:
    """The home's namespace and the cluster's nodes now (joined and left again)."""
    cluster = Cluster(settings, home_root)
    cluster.connect()
    try:
        return cluster.namespace, cluster.nodes()
    finally:
        cluster.close()


def _namespace_of(root: Path) -> str:
    import re

    return "llama-orch-" + (re.sub(r"[^a-zA-Z0-9._-]", "-", root.resolve().name) or "home")[:50]


def _reachable(address: str, timeout: float = 3.0) -> None:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise OrchError(
            f"The Ray cluster's head at {address} does not answer ({exc.strerror or exc}); "
            "is `ray start --head` running there, and is cluster.address in llama-orch.json right?"
        ) from None


def _why_not_joined(address: str, exc: Exception) -> str:
    text = str(exc)
    if "ersion mismatch" in text:
        first = next((ln.strip() for ln in text.splitlines() if "Ray:" in ln), "")
        return (
            f"The Ray cluster at {address} runs another Ray or Python version than this machine "
            f"({first}); install the same versions on every node."
        )
    if "uthentication" in text or "InvalidAuthToken" in text:
        return (
            f"The Ray cluster at {address} refused this machine's token; give it the cluster's "
            "token (~/.ray/auth_token or $RAY_AUTH_TOKEN)."
        )
    last = text.strip().splitlines()[-1] if text.strip() else type(exc).__name__
    return f"Could not join the Ray cluster at {address}: {last}"
