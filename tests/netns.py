"""Real extra hosts for the multi-host tests: each a Linux network namespace
(iproute2) joined to this one by a veth pair, with its own address, home,
and a real OpenSSH server (Debian's openssh-server) on port 22 with a
generated host key, that lets in a generated user key.

This process is host A (the root namespace): it reaches host N at
10.<net>.<N>.2, and host N reaches it at 10.<net>.<N>.1. `cut`/`restore`
take the link down and up at the host's end. Commands run "on" a host with
`ip netns exec` (the daemons, the servers they start) or over ssh.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def why_not() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if os.name != "posix" or sys.platform != "linux":
        return "network namespaces are Linux's"
    if os.geteuid() != 0:
        return "making network namespaces needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN)"
    if not shutil.which("ip"):
        return "iproute2's `ip` is not installed (.ci/run installs it)"
    probe = f"lo-probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode:
        return f"`ip netns add` is refused here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def sh(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True, **kw)


@dataclass
class Host:
    name: str
    ns: str
    addr: str  # its address, as A reaches it
    link: str  # A's end of the veth pair
    far: str  # the host's end
    root: Path  # its folder: home, keys
    sshd: subprocess.Popen[bytes] | None = None

    @property
    def home(self) -> Path:
        return self.root / "home"

    def run(self, *argv: str, timeout: float = 120, env: dict[str, str] | None = None):
        """A command on this host (in its namespace; same files, other network)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.ns, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )

    def cli(self, *args: str, timeout: float = 120):
        return self.run(
            sys.executable,
            "-m",
            "llama_orchestrator",
            "--home",
            str(self.home),
            *args,
            timeout=timeout,
        )

    def cut(self) -> None:
        """The cable pulled at the host's end: A's end keeps its address and
        route (no carrier), so what A sends goes nowhere and nothing answers
        (from A's end, the route would go and packets take the default one)."""
        sh("ip", "netns", "exec", self.ns, "ip", "link", "set", self.far, "down")

    def restore(self) -> None:
        sh("ip", "netns", "exec", self.ns, "ip", "link", "set", self.far, "up")


class Hosts:
    """Hosts made on demand; `close` takes every one of them down again."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.tag = f"{os.getpid() % 100000}"
        # 10.<net>.N.0/24: unlikely to clash with a real one, and never with
        # another worker's of this run (pytest-xdist: gw0, gw1, ... each a quarter)
        worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
        self.net = 100 + (worker % 4) * 25 + os.getpid() % 25
        self.hosts: list[Host] = []
        self.keys = base / "keys"
        self.keys.mkdir(parents=True, exist_ok=True)
        for key in ("user", "stranger", "host", "impostor"):
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key, "-f", str(self.keys / key))
        (self.keys / "authorized_keys").write_text((self.keys / "user.pub").read_text())
        (self.keys / "authorized_keys").chmod(0o600)

    def add(self, name: str) -> Host:
        n = len(self.hosts) + 1
        ns = f"lo-{name}-{self.tag}"
        link = f"lo{name}{self.tag}"[:15]
        peer = f"lp{name}{self.tag}"[:15]
        addr, mine = f"10.{self.net}.{n}.2", f"10.{self.net}.{n}.1"
        sh("ip", "netns", "add", ns)
        host = Host(name, ns, addr, link, peer, self.base / name)
        self.hosts.append(host)
        host.home.joinpath("instances").mkdir(parents=True)
        sh("ip", "link", "add", link, "type", "veth", "peer", "name", peer)
        sh("ip", "link", "set", peer, "netns", ns)
        sh("ip", "addr", "add", f"{mine}/24", "dev", link)
        sh("ip", "link", "set", link, "up")
        for cmd in (
            ["ip", "addr", "add", f"{addr}/24", "dev", peer],
            ["ip", "link", "set", peer, "up"],
            ["ip", "link", "set", "lo", "up"],
        ):
            sh("ip", "netns", "exec", ns, *cmd)
        return host

    def start_sshd(self, host: Host) -> None:
        """A real sshd in the host's namespace on its address, port 22."""
        Path("/run/sshd").mkdir(exist_ok=True)  # its privilege-separation folder
        bindir = str(Path(sys.executable).parent)
        mark = os.environ.get("LLAMA_ORCH_TEST_SESSION", "")
        host.sshd = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                host.ns,
                SSHD,
                "-D",
                "-e",
                "-f",
                "/dev/null",
                "-o",
                f"ListenAddress={host.addr}",
                "-o",
                f"HostKey={self.keys / 'host'}",
                "-o",
                f"AuthorizedKeysFile={self.keys / 'authorized_keys'}",
                "-o",
                "PidFile=none",
                "-o",
                "UsePAM=no",
                "-o",
                "StrictModes=no",
                "-o",
                "PasswordAuthentication=no",
                "-o",
                "KbdInteractiveAuthentication=no",
                "-o",
                "PermitRootLogin=prohibit-password",
                # a session whose client vanished (a cut link, a killed daemon's ssh)
                # ends within seconds, and with it what it ran
                "-o",
                "ClientAliveInterval=2",
                "-o",
                "ClientAliveCountMax=3",
                # what the commands it runs see: our python first, and this test
                # session's mark (the leak check finds what they leave running)
                "-o",
                f"SetEnv=PATH={bindir}:/usr/local/bin:/usr/bin:/bin LLAMA_ORCH_TEST_SESSION={mark}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(host.root / "sshd.log", "wb"),  # noqa: SIM115 - closed with the process
        )
        deadline = time.monotonic() + 10
        while "Server listening" not in (host.root / "sshd.log").read_text():
            if host.sshd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start: {(host.root / 'sshd.log').read_text()}")
            time.sleep(0.05)

    def ssh_config(self, key: str = "user", host_key: str = "host") -> Path:
        """An ssh_config for the client: `key` as the identity, and
        known_hosts holding `host_key` for every host (strict checking)."""
        public = (self.keys / f"{host_key}.pub").read_text().split()
        known = self.base / f"known_hosts.{host_key}"
        known.write_text("".join(f"{h.addr} {public[0]} {public[1]}\n" for h in self.hosts))
        config = self.base / f"ssh_config.{key}.{host_key}"
        config.write_text(
            "Host *\n"
            f"  IdentityFile {self.keys / key}\n"
            "  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {known}\n"
            "  StrictHostKeyChecking yes\n"
            "  ConnectTimeout 5\n"
        )
        return config

    def close(self) -> None:
        """Every host down, and nothing left running in it: an sshd session
        whose client vanished with the link never learns it did, and would
        keep what it runs (a `system task` follower) forever."""
        for h in self.hosts:
            if h.sshd is not None:
                h.sshd.terminate()
                h.sshd.wait(10)
            left = sh("ip", "netns", "pids", h.ns, check=False).stdout.split()
            for pid in left:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "link", "del", h.link, check=False)
            sh("ip", "netns", "del", h.ns, check=False)
