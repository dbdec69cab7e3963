"""A real Ray cluster for the cluster tests: the head in this (root)
namespace, each node a network namespace of `tests.netns` (its own
address, a link that `cut` pulls), every one started by llama-orch's own
`cluster start --block` with token auth and fake cards declared
(`--gpu-mib`), as an operator starts theirs.

The head listens on an address put on this namespace's loopback, which
every node reaches through its link (their default route). Everything a
cluster starts carries its mark in the environment, so `close` finds and
ends all of it (Ray's daemons, workers, the servers they run), wherever.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.netns import Host, Hosts, sh

MARK = "LLAMA_ORCH_TEST_RAY"


def why_not() -> str | None:
    from tests.netns import why_not as ns_why_not

    if (why := ns_why_not()) is not None:
        return why
    try:
        import ray  # noqa: F401
    except ImportError:
        return "Ray is not installed (the dev extra installs it)"
    return None


class RayCluster:
    def __init__(self, base: Path, port: int = 0) -> None:
        self.base = base
        self.hosts = Hosts(base / "hosts")
        self.tag = secrets.token_hex(4)
        self.token = secrets.token_hex(24)
        self.head_ip = f"10.{self.hosts.net}.0.1"
        self.port = port or 20000 + (os.getpid() % 20000)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.nodes: dict[str, Host] = {}
        self.gateways: dict[str, str] = {}
        self.env = {
            **os.environ,
            "RAY_AUTH_TOKEN": self.token,
            MARK: self.tag,
            "LLAMA_ORCH_TEST_SESSION": os.environ.get("LLAMA_ORCH_TEST_SESSION", ""),
        }
        self.env.pop("RAY_ADDRESS", None)

    @property
    def address(self) -> str:
        return f"{self.head_ip}:{self.port}"

    def _start(self, argv: list[str], log: Path, timeout: float = 90) -> None:
        """Run a `cluster start --block` and wait until Ray says it runs: one
        at a time (two raylets registering at once on two cores time out)."""
        proc = subprocess.Popen(
            argv,
            env=self.env,
            stdout=open(log, "wb"),  # noqa: SIM115 - closed with the process
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[-3:]} did not start: {log.read_text()[-3000:]}")
            time.sleep(0.1)

    def _cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "llama_orchestrator", "cluster", "start", *args, "--block"]

    def start_head(self) -> None:
        sh("ip", "addr", "add", f"{self.head_ip}/32", "dev", "lo")
        self.base.mkdir(parents=True, exist_ok=True)
        self._start(
            self._cli(
                "--head",
                "--ip",
                self.head_ip,
                "--port",
                str(self.port),
                "--node-name",
                "head",
                "--gpu-mib",
                "",
                "--no-instances",
            ),
            self.base / "head.log",
        )

    def add_node(self, name: str, cards_mib: list[int]) -> Host:
        host = self.hosts.add(name)
        n = len(self.hosts.hosts)
        self.gateways[name] = f"10.{self.hosts.net}.{n}.1"
        self._route(host)
        self.nodes[name] = host
        self._start(
            [
                "ip",
                "netns",
                "exec",
                host.ns,
                *self._cli(
                    "--address",
                    self.address,
                    "--ip",
                    host.addr,
                    "--node-name",
                    name,
                    "--gpu-mib",
                    ",".join(map(str, cards_mib)),
                ),
            ],
            self.base / f"{name}.log",
        )
        return host

    def _route(self, host: Host) -> None:
        """The head through the link (a route the link's going down removes)."""
        gateway = self.gateways[host.name]
        sh("ip", "netns", "exec", host.ns, "ip", "route", "replace", "default", "via", gateway)

    def cut(self, name: str) -> None:
        self.nodes[name].cut()

    def restore(self, name: str) -> None:
        self.nodes[name].restore()
        self._route(self.nodes[name])

    def wait_nodes(self, home: Path, count: int, timeout: float = 120) -> list[dict]:
        """Until `count` nodes (the head included) are up, as `cluster status` says."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            r = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "llama_orchestrator",
                    "--home",
                    str(home),
                    "cluster",
                    "status",
                    "--json",
                ],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            if r.returncode == 0:
                nodes = json.loads(r.stdout)["nodes"]
                if sum(1 for n in nodes if n["alive"]) >= count:
                    return nodes
                last = r.stdout
            else:
                last = r.stderr
            time.sleep(0.5)
        logs = "\n".join(p.read_text()[-2000:] for p in self.base.glob("*.log"))
        raise RuntimeError(f"the cluster did not come up: {last}\n{logs}")

    def processes(self) -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if p.environ().get(MARK) == self.tag:
                    out.append(p)
        return out

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.1)
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                p.kill()
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.wait(5)
        self.hosts.close()
        sh("ip", "addr", "del", f"{self.head_ip}/32", "dev", "lo", check=False)
