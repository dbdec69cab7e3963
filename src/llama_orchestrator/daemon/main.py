"""Starting, running and stopping the daemon of one home (DESIGN §5).

run_foreground(home)     the daemon itself: lock, supervisor, control API
start_background(home)   what `up` and `daemon start` call: spawn it detached
stop(home, all_)         ask it to exit (optionally stopping instances first)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import logging.handlers
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llama_orchestrator import __version__, platform
from llama_orchestrator.config.parse import load_settings
from llama_orchestrator.config.settings import RouterSettings
from llama_orchestrator.daemon.info import (
    DaemonInfo,
    lock_is_held,
    running,
    take_lock,
    wait_running,
    write_info,
)
from llama_orchestrator.engine import logs
from llama_orchestrator.engine.process import ProcRef, create_time_of, is_alive
from llama_orchestrator.errors import OrchError
from llama_orchestrator.files import private_dir
from llama_orchestrator.home import Home

if TYPE_CHECKING:
    from llama_orchestrator.engine.status import StatusReply
    from llama_orchestrator.wire.server import Limits

__all__ = ["run_foreground", "start_background", "stop", "Started", "DAEMON_ENV"]

#: set in the daemon's environment (tests and `ps` tell it from other Pythons)
DAEMON_ENV = "LLAMA_ORCH_DAEMON"
START_TIMEOUT = 30.0

log = logging.getLogger("llama_orchestrator.daemon")


class _JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        for key in ("instance", "kind", "data", "instances"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _setup_logging(home: Home) -> logging.Handler:
    settings = load_settings(home.settings_path)
    private_dir(home.logs_dir)
    handler = logging.handlers.RotatingFileHandler(
        home.daemon_log,
        maxBytes=settings.logs.max_bytes,
        backupCount=settings.logs.backups,
        encoding="utf-8",
    )
    handler.setFormatter(_JsonLines())
    root = logging.getLogger("llama_orchestrator")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False
    return handler


class AlreadyRunning(Exception):
    def __init__(self, info: DaemonInfo | None) -> None:
        super().__init__("already running")
        self.info = info


def exit_now() -> None:
    """End the daemon's process at once: the logs flushed, no interpreter teardown."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_foreground(home: Home, stop_instances_on_signal: bool = False) -> None:
    """Be the daemon of `home` until SIGTERM/SIGINT or `daemon stop`.

    `stop_instances_on_signal`: a signal stops the instances first (what a
    service manager's stop means); otherwise they keep running, to be adopted.

    Raises AlreadyRunning when another process holds the home's lock."""
    private_dir(home.state_dir)
    lock = take_lock(home)
    if lock is None:
        raise AlreadyRunning(wait_running(home, 5.0))
    try:
        _setup_logging(home)
        try:  # uvloop (uvicorn[standard] brings it on Linux and macOS) is a cheaper loop
            import uvloop

            runner: Any = uvloop.run
        except ImportError:
            runner = asyncio.run
        runner(_serve(home, stop_instances_on_signal))
    finally:
        lock.close()


def _capped_protocol(cap: int) -> type:
    """uvicorn's h11 protocol with a cap on connections, as the router has."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    order: dict[H11Protocol, None] = {}  # the open connections, oldest first

    class Capped(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            order[self] = None
            if len(order) > cap:
                stalled = next((c for c in order if c is not self and _between_requests(c)), None)
                if stalled is not None:
                    order.pop(stalled, None)
                    stalled.transport.abort()

        def connection_lost(self, exc: Exception | None) -> None:
            order.pop(self, None)
            super().connection_lost(exc)

    return Capped


def _between_requests(c: Any) -> bool:
    """No request of it is being answered (idle, or its head still unsent)."""
    return c.cycle is None or c.cycle.response_complete


def _quiet_server() -> type:
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn without its own signal handlers: ours decide what a signal means."""

        def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
            return contextlib.nullcontext()

    return _Server


async def _serve(home: Home, stop_instances_on_signal: bool) -> None:
    import uvicorn

    from llama_orchestrator.daemon.api import build_app
    from llama_orchestrator.daemon.effects import LiveEffects
    from llama_orchestrator.daemon.metrics import Metrics
    from llama_orchestrator.daemon.parts import Parts
    from llama_orchestrator.engine.views import status_reply
    from llama_orchestrator.wire.pool import Pool

    _Server = _quiet_server()

    started_at = time.time()
    metrics: Metrics | None = None

    def on_event(instance: str | None, kind: str, message: str, data: dict[str, Any]) -> None:
        """Every event the daemon records goes to daemon.log, and is counted."""
        log.info(message, extra={"instance": instance, "kind": kind, "data": data})
        if metrics is not None:
            metrics.event(instance, kind)

    settings = load_settings(home.settings_path)
    pool = Pool()  # the one HTTP client: forwarding, probes, upstream checks, peers
    effects: LiveEffects
    if settings.cluster is not None:  # the instances run on a Ray cluster's nodes
        from llama_orchestrator.daemon.cluster import ClusterEffects

        effects = ClusterEffects(home, pool, settings.cluster, on_event=on_event)
    else:
        effects = LiveEffects(home, pool, on_event=on_event)
    await effects.connect()  # a cluster it cannot join: the daemon says why and exits
    store = effects.engine().store  # the loop thread's connection
    parts = Parts.build(
        home, settings, effects, pool, store, lambda fn: effects.in_thread(lambda e: fn(e.store))
    )
    metrics, sup, router = parts.metrics, parts.sup, parts.router

    async def status_view() -> StatusReply:
        """`ps` through the daemon: the same view, made here, where the configs
        are read, with what only the daemon knows (the load queue)."""
        return sup.seen_here(await effects.in_thread(status_reply))

    async def instance_rows() -> list[dict[str, Any]]:
        return list((await status_view()).instances)  # type: ignore[arg-type]

    router_server, router_url, router_error = _router(
        home, router, store, metrics, instance_rows, parts.switch
    )
    sock = platform.bind_control(home.daemon_socket)
    transport = platform.CONTROL_TRANSPORT
    token = secrets.token_urlsafe(32) if transport == "tcp" else None
    port = sock.getsockname()[1] if transport == "tcp" else None
    address = str(home.daemon_socket) if transport == "unix" else f"127.0.0.1:{port}"
    stop_instances = False

    def request_exit(all_: bool) -> None:
        nonlocal stop_instances
        stop_instances = stop_instances or all_
        server.should_exit = True

    app = build_app(
        sup,
        effects.engine(),
        metrics,
        parts.plans,
        started_at=started_at,
        address=address,
        token=token,
        request_exit=request_exit,
        status_view=status_view,
        router_url=router_url,
        router_error=router_error,
        peers=parts.peers.to_json,
    )
    server = _Server(
        uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
            http=_capped_protocol(CONTROL_MAX_CONNECTIONS),
        )
    )
    loop = asyncio.get_running_loop()

    def on_signal(name: str) -> None:
        loop.call_soon_threadsafe(_on_signal, name, request_exit, stop_instances_on_signal)

    platform.on_stop_signals(on_signal)
    log.info(f"daemon {os.getpid()} started for {home.root}", extra={"data": {"address": address}})
    store.add_event(None, "daemon_started", f"daemon {os.getpid()} started")
    await parts.start()
    write_info(
        home,
        DaemonInfo(
            pid=os.getpid(),
            create_time=create_time_of(os.getpid()),
            started_at=started_at,
            transport=transport,
            socket=str(home.daemon_socket) if transport == "unix" else None,
            port=port,
            token=token,
            version=__version__,
            router_url=router_url,
            router_error=router_error,
        ),
    )
    router_task = asyncio.create_task(router_server()) if router_url else None
    try:
        await server.serve(sockets=[sock])
    finally:
        with contextlib.suppress(FileNotFoundError):
            home.daemon_info.unlink()
        await parts.stop(stop_instances)  # drains the router's replicas on --all
        if router_task is not None:
            router_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await router_task
        await parts.close()
        await effects.close()
        if transport == "unix":
            with contextlib.suppress(FileNotFoundError):
                home.daemon_socket.unlink()


def _router(
    home: Home, router: Any, store: Any, metrics: Any, instances: Any, models: Any
) -> tuple[Any, str | None, str | None]:
    """The router's server (a coroutine function), URL and None; (None, None,
    why) when it cannot or must not listen: that is recorded and shown by up,
    ps and daemon status, and supervision goes on (plans use the router even
    when it does not listen)."""
    import socket

    from llama_orchestrator.router.app import RouterSite, is_loopback
    from llama_orchestrator.wire.server import serve

    settings = router.settings
    hosts = settings.hosts()
    wide = [h for h in hosts if not is_loopback(h)]
    if wide and not settings.api_keys:
        why = (
            f"The router does not listen on {wide[0]} without API keys; "
            "set router.api_keys in llama-orch.json (or keep router.host on 127.0.0.1)."
        )
        store.add_event(None, "router_refused", why)
        return None, None, why
    socks: list[socket.socket] = []
    try:
        for h in hosts:
            family = socket.AF_INET6 if ":" in h else socket.AF_INET
            socks.append(socket.create_server((h, settings.port), family=family, backlog=1024))
    except OSError as exc:
        for bound in socks:
            bound.close()
        free = next(
            (
                p
                for p in range(settings.port + 1, settings.port + 100)
                if all(platform.port_is_free(h, p) for h in hosts)
            ),
            None,
        )
        suggestion = f' ({{"router": {{"port": {free}}}}} is free)' if free else ""
        why = (
            f"The router cannot listen on {h}:{settings.port} ({exc.strerror or exc}; "
            f"another home's daemon?); set router.port in llama-orch.json{suggestion} and "
            "restart the daemon (`llama-orch daemon stop`, then `up`)."
        )
        store.add_event(None, "router_failed", why)
        return None, None, why

    def render() -> tuple[bytes, str]:
        from llama_orchestrator.daemon.metrics import CONTENT_TYPE

        return metrics.render(), CONTENT_TYPE

    site = RouterSite(router, render, instances, models)
    host = f"[{hosts[0]}]" if ":" in hosts[0] else hosts[0]
    limits = router_limits(settings, platform.raise_open_files_limit())
    return (lambda: serve(socks, site, limits)), f"http://{host}:{settings.port}", None


#: descriptors kept for the control socket, logs, the database and the daemon's
#: own requests, whatever the router's clients take
FD_RESERVE = 128
#: connections to the control API at once, out of the reserve: past it, the
#: oldest one that is not in the middle of a request gives way, so that a
#: flood (of the same user) cannot take every descriptor and leave `up` and
#: `down` unanswered
CONTROL_MAX_CONNECTIONS = FD_RESERVE // 2


def router_limits(settings: RouterSettings, open_files: int) -> Limits:
    """The router's limits: its settings, with client connections capped so
    that each (and its connection to an instance) fits in the open-files
    limit and the reserve stays free (pure)."""
    from llama_orchestrator.wire.server import Limits

    fit = max(1, (open_files - FD_RESERVE) // 2)
    return Limits(
        header_timeout=settings.header_timeout,
        body_timeout=settings.body_timeout,
        send_timeout=settings.send_timeout,
        keepalive_timeout=settings.keepalive_timeout,
        max_connections=min(settings.max_connections, fit),
    )


def reset_state_aside(home: Home) -> Path | None:
    """`daemon start --reset-state`: the database moved aside, refused while a
    daemon runs (it holds the database open)."""
    from llama_orchestrator.store.database import reset_state

    info = running(home)
    if info is not None:
        raise OrchError(
            f"The daemon of {home.root} runs (pid {info.pid}) and holds its state database.",
            hint="Stop it first (`llama-orch daemon stop`), then start it with --reset-state.",
        )
    return reset_state(home.db_path, time.time())


def _on_signal(name: str, request_exit: Any, stop_instances: bool) -> None:
    what = "stopping the instances, then the daemon" if stop_instances else "instances keep running"
    log.info(f"received {name}: {what}")
    request_exit(stop_instances)


@dataclass(frozen=True)
class Started:
    info: DaemonInfo
    new: bool  # False: one was running already


def start_background(home: Home, timeout: float = START_TIMEOUT) -> Started:
    """Start the daemon of `home` detached (its own session / process group,
    output to logs/daemon.out) and wait until its control API answers."""
    info = running(home)
    if info is not None:
        return Started(info, False)
    if lock_is_held(home):  # one is starting right now (another `up`)
        info = wait_running(home, timeout)
        if info is not None:
            return Started(info, False)
    settings = load_settings(home.settings_path)  # a broken llama-orch.json: say so here, exit 2
    if settings.cluster is not None:  # a cluster it cannot join: said here, nothing started
        from llama_orchestrator.cluster.rayclient import preflight

        preflight(settings.cluster)
    private_dir(home.logs_dir)
    out_path = home.logs_dir / "daemon.out"
    argv = [
        sys.executable,
        "-m",
        "llama_orchestrator",
        "--home",
        str(home.root),
        "daemon",
        "start",
        "--foreground",
    ]
    env = {**os.environ, DAEMON_ENV: "1"}
    with open(out_path, "ab") as out:
        proc = platform.spawn(argv, env, home.root, out, out)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = running(home)
        if info is not None:
            return Started(info, info.pid == proc.pid)
        code = proc.poll()
        if code is not None and not lock_is_held(home):
            tail = "\n".join(f"  | {ln}" for ln in logs.tail_lines(out_path, 10))
            raise OrchError(
                f"The llama-orch daemon exited at once (code {code}).\n{tail}".rstrip(),
                hint=f"See {out_path} and {home.daemon_log}; `llama-orch up --no-daemon` runs without it.",
            )
        time.sleep(0.02)
    raise OrchError(
        f"The llama-orch daemon did not come up within {timeout:g}s.",
        hint=f"See {out_path} and {home.daemon_log}.",
    )


def stop(home: Home, all_: bool, timeout: float = 120.0) -> DaemonInfo | None:
    """Ask the daemon to exit and wait until it has; None when none ran."""
    from llama_orchestrator.daemon.client import DaemonClient

    info = running(home)
    if info is None:
        return None
    try:
        DaemonClient(info, timeout=10).call("POST", "/v1/shutdown", {"all": all_})
    except OrchError:
        platform.request_stop(info.pid)  # no answer: the signal works as well
    ref = ProcRef(info.pid, info.create_time)
    deadline = time.monotonic() + timeout
    while is_alive(ref) or lock_is_held(home):
        if time.monotonic() > deadline:
            raise OrchError(
                f"The llama-orch daemon (pid {info.pid}) did not exit within {timeout:g}s.",
                hint=f"See {home.daemon_log}.",
            )
        time.sleep(0.02)
    return info
