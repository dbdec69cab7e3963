"""The actor that runs one instance's llama-server on the node Ray placed it
on (`cluster.ray` makes it a detached, named Ray actor).

It does what the spawn, stop and exit watch of a daemon do on one box, and
nothing more: the head's daemon decides (the same runner, health step,
backoff and crash-loop rule as on one box) and calls it. Its server:

- is started from one thread that lives as long as the actor, with
  PR_SET_PDEATHSIG, so a killed actor (Ray's `kill`, a dead node's raylet)
  takes its server with it;
- writes its logs on this node, which the head's daemon copies into the
  home's log folder as they grow (`read`), so `logs`, `describe` and the
  dashboard read them as they read a local instance's;
- sees no `RAY_*` variable (the cluster's token stays with Ray).

A fence guards against two of one instance: every second the actor asks the
cluster which actor holds its name; when that is another (the head started
the instance elsewhere while this node was cut off), it stops its server
and exits. While the cluster does not answer, nothing changes.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from llama_orchestrator import platform
from llama_orchestrator.engine import logs
from llama_orchestrator.engine.process import ProcRef, create_time_of, find, stop_tree

__all__ = ["InstanceHost", "ScriptHost", "node_dir", "FENCE_INTERVAL"]

FENCE_INTERVAL = 1.0
#: the logs kept on a node, as `logs` in llama-orch.json keeps them on one box
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 3
EXIT_TAIL_LINES = 20


def node_dir(namespace: str, node_ip: str, name: str) -> Path:
    """Where an instance's logs live on its node (the node's IP in the path:
    nodes that share a home folder keep theirs apart)."""
    from platformdirs import user_state_dir

    return Path(user_state_dir("llama-orch")) / "cluster" / namespace / node_ip / name


class InstanceHost:
    def __init__(self, name: str, namespace: str) -> None:
        import ray

        self.name = name
        self.namespace = namespace
        self.actor_name = f"instance:{name}"
        self.ip = ray.util.get_node_ip_address()
        self.dir = node_dir(namespace, self.ip, name)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._ref: ProcRef | None = None
        self._proc: Any = None
        self._started_at: float | None = None
        self._exit: dict[str, Any] | None = None
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()
        # the spawning thread: PR_SET_PDEATHSIG fires when it ends, so it never does
        self._spawner = ThreadPoolExecutor(1, thread_name_prefix="spawner")
        self._me = ray.get_runtime_context().get_actor_id()
        threading.Thread(target=self._fence, daemon=True, name="fence").start()

    # --- what the head asks ---------------------------------------------------

    def where(self) -> dict[str, Any]:
        return {"ip": self.ip, "pid": os.getpid(), "dir": str(self.dir)}

    def start(self, argv: list[str], added_env: dict[str, str]) -> dict[str, Any]:
        """Start the server unless it runs; its pid, start time and when."""
        with self._lock:
            if self._ref is not None and find(self._ref) is not None:
                return self._running()
            argv = [_binary(argv[0]), *argv[1:]]
            model = argv[argv.index("-m") + 1] if "-m" in argv else None
            if model and not Path(model).is_file():
                raise RuntimeError(
                    f"the model {model} is not on node {self.ip}; put it at the same path there"
                )
            env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
            env.update(added_env)
            self._sizes = {st: _size(logs.log_file(self.dir, st)) for st in logs.STREAMS}
            self._started_at = time.time()
            self._exit = None
            self._proc = self._spawner.submit(self._spawn, argv, env).result()
            self._ref = ProcRef(self._proc.pid, _create_time(self._proc.pid))
            return self._running()

    def wait_exit(self, pid: int) -> dict[str, Any]:
        """Return once the server `pid` has ended: how it ended."""
        proc = self._proc
        if proc is not None and proc.pid == pid:
            proc.wait()
        else:
            while find(ProcRef(pid, 0.0)) is not None:
                time.sleep(0.2)
        return self.exit_info()

    def exit_info(self) -> dict[str, Any]:
        with self._lock:
            proc = self._proc
            if proc is not None and proc.poll() is not None and self._exit is None:
                code = proc.returncode
                self._exit = {
                    "code": None if code < 0 else code,
                    "signal": -code if code < 0 else None,
                    "at": time.time(),
                    "stderr_tail": logs.server_lines(
                        logs.log_file(self.dir, "stderr"), EXIT_TAIL_LINES
                    ),
                }
            return dict(self._exit or {"code": None, "signal": None, "at": time.time()})

    def stop(self, grace: float) -> bool:
        """Stop the server's tree (graceful first); True when that was enough."""
        ref = self._ref
        if ref is None:
            return True
        graceful = stop_tree(ref, grace)
        if self._proc is not None:
            self._proc.wait()
        return graceful

    def ping(self) -> dict[str, Any]:
        ref = self._ref
        alive = ref is not None and find(ref) is not None
        self._rotate()
        sizes = {st: _size(logs.log_file(self.dir, st)) for st in logs.STREAMS}
        return {"pid": ref.pid if ref else None, "alive": alive, "ip": self.ip, "sizes": sizes}

    def logs(self, stream: str, tail: int) -> list[str]:
        return logs.tail_lines(logs.log_file(self.dir, stream), tail)

    def read(self, offsets: dict[str, int], limit: int = 4 << 20) -> dict[str, tuple[int, bytes]]:
        """What each log gained past its offset: (the new offset, the bytes);
        a rotated log is read again from its start."""
        out = {}
        for stream, offset in offsets.items():
            path = logs.log_file(self.dir, stream)
            size = _size(path)
            if offset > size:
                offset = 0
            data = b""
            if size > offset:
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read(limit)
            out[stream] = (offset + len(data), data)
        return out

    # --- inside -------------------------------------------------------------------

    def _running(self) -> dict[str, Any]:
        assert self._ref is not None
        return {
            "sizes": self._sizes,  # of its logs before this run's first line
            "pid": self._ref.pid,
            "create_time": self._ref.create_time,
            "started_at": self._started_at,
            "ip": self.ip,
            "dir": str(self.dir),
        }

    def _spawn(self, argv: list[str], env: dict[str, str]) -> Any:
        paths = {st: logs.log_file(self.dir, st) for st in logs.STREAMS}
        assert self._started_at is not None
        with open(paths["stdout"], "ab") as out, open(paths["stderr"], "ab") as err:
            for f in (out, err):
                f.write(logs.start_line(self._started_at).encode() + b"\n")
                f.flush()
            return platform.spawn(argv, env, self.dir, out, err, die_with_parent=True)

    def _rotate(self) -> None:
        header = None if self._started_at is None else logs.start_line(self._started_at, True)
        for stream in logs.STREAMS:
            with contextlib.suppress(OSError):
                logs.rotate_if_needed(
                    logs.log_file(self.dir, stream), LOG_MAX_BYTES, LOG_BACKUPS, header
                )

    def _fence(self) -> None:
        import ray

        while True:
            time.sleep(FENCE_INTERVAL)
            try:
                holder = ray.get_actor(self.actor_name, namespace=self.namespace)
                theirs = holder._actor_id.hex()
            except ValueError:
                theirs = None  # the name is free: the head let this instance go
            except Exception:
                continue  # the cluster does not answer: nothing is known
            if theirs != self._me:
                self._fenced()

    def _fenced(self) -> None:
        """Another actor holds the name (or none does): this one must not serve."""
        with contextlib.suppress(Exception):
            self.stop(5.0)
        os._exit(0)


def _binary(path: str) -> str:
    """The head's llama-server path when it is there, else this node's own."""
    if Path(path).is_file():
        return path
    from llama_orchestrator.config.binary import find_llama_server

    return str(find_llama_server(None, Path.cwd()))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _create_time(pid: int) -> float:
    try:
        return create_time_of(pid)
    except Exception:  # already gone: a time that matches nothing
        return 0.0


class ScriptHost:
    """The actor that runs one attempt of a plan's script task on its node,
    holding its cards in Ray's ledger while it runs. Killing the actor (a
    cancel, a timeout) ends the command's whole process group with it."""

    def __init__(self) -> None:
        self._spawner = ThreadPoolExecutor(1, thread_name_prefix="spawner")

    def run(
        self, argv: list[str], env: dict[str, str], cwd: str, limit: int = 8 << 20
    ) -> dict[str, Any]:
        """Run the command to its end: its exit code (or signal) and the
        first `limit` bytes of its stdout and stderr."""
        import tempfile

        full = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        full.update(env)
        folder = Path(cwd) if Path(cwd).is_dir() else Path(tempfile.gettempdir())
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:

            def spawn() -> Any:
                return platform.spawn(argv, full, folder, out, err, die_with_parent=True)

            try:
                proc = self._spawner.submit(spawn).result()
            except OSError as exc:
                return {"error": f"cannot run {argv[0]!r} on this node: {exc.strerror or exc}"}
            code = proc.wait()
            out.seek(0)
            err.seek(0)
            return {
                "code": None if code < 0 else code,
                "signal": -code if code < 0 else None,
                "out": out.read(limit),
                "err": err.read(limit),
                "ip": _node_ip(),
            }


def _node_ip() -> str:
    import ray

    return str(ray.util.get_node_ip_address())
