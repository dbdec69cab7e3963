"""Waiting for `up`: until each instance started is healthy, died, or its
time is up, telling the caller's progress on the way.

An instance a daemon supervises is healthy when the daemon says so (its
row); one this engine owns is probed here and its health step recorded, so
that `up` without a daemon leaves the same row a daemon would.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from llama_orchestrator.engine import health, logs
from llama_orchestrator.engine.process import activity
from llama_orchestrator.engine.results import Progress, UpResult, exit_text, with_tail
from llama_orchestrator.engine.step import Watch, step
from llama_orchestrator.errors import StartFailed
from llama_orchestrator.states import RUNNING_STATES
from llama_orchestrator.states import InstanceState as S
from llama_orchestrator.store.rows import InstanceRow

if TYPE_CHECKING:
    from llama_orchestrator.config.instance import InstanceConfig
    from llama_orchestrator.engine.lifecycle import Engine

__all__ = ["finish_up", "wait_healthy", "POLL_INTERVAL", "STATE_POLL_INTERVAL"]

POLL_INTERVAL = 0.05  # seconds between health probes while waiting for `up`
STATE_POLL_INTERVAL = 0.02  # seconds between reads of the state a daemon writes


def finish_up(
    engine: Engine,
    results: list[UpResult],
    wait: bool,
    timeout: float,
    on_progress: Progress | None,
) -> list[UpResult]:
    """The end of an `up` (with a daemon or without): with `wait`, until each
    is healthy; StartFailed (exit 1) naming each instance that died or timed
    out, with its exit code and last stderr lines."""
    if wait:
        wait_healthy(engine, results, timeout, on_progress)
    failed = [r.error for r in results if r.error]
    if failed:
        raise StartFailed("\n".join(failed))
    return results


def wait_healthy(
    engine: Engine, results: list[UpResult], timeout: float, on_progress: Progress | None = None
) -> None:
    """Wait until each instance is healthy, died, or `timeout` passed; set
    `error` on the results that did not make it. An instance a daemon
    supervises is healthy when the daemon says so; others are probed here."""
    configs: dict[str, InstanceConfig] = {}  # read only when this engine probes
    watches: dict[str, Watch] = {}  # the health step's memory, per instance it owns
    start = time.monotonic()
    pending = {r.name: r for r in results}
    while pending:
        elapsed = time.monotonic() - start
        probed = False
        for name, res in list(pending.items()):
            row = engine.observe(engine.store.get_or_new(name))
            if row.state == S.QUEUED and res.pid is None:  # the daemon loads others first
                if on_progress:
                    on_progress(name, "queued", elapsed, "waiting for its turn to load")
                continue
            if row.state == S.BACKOFF and res.pid is None and res.outcome == "waiting":
                if on_progress:  # a start that waits for something (a cluster's node, room)
                    on_progress(name, "waiting", elapsed, "waiting to start")
                continue
            if res.pid is None and row.state in RUNNING_STATES:  # its turn came
                res.pid, res.outcome = row.pid, "started"
                res.host = row.host if row.node else None
            if row.state not in RUNNING_STATES or row.pid != res.pid:
                res.error = _death_message(engine, name, row)
                del pending[name]
                continue
            if engine.owns(row):
                probed = True
                if not configs:
                    from llama_orchestrator.config.validate import load_all

                    configs = {x.name: x.config for x in load_all(engine.home) if x.config}
                cfg = configs[name]
                probe = health.probe(
                    cfg.server.host,
                    cfg.server.port,
                    min(cfg.healthcheck.timeout, 2.0),
                    engine.get,
                )
                now = engine.clock()
                s = step(
                    row.state,
                    row.desired,
                    row.started_at,
                    watches.setdefault(name, Watch(since=now)),
                    probe,
                    cfg.healthcheck,
                    cfg.restart_policy.effective_mode,  # its `restart` is not acted on here
                    now,
                    logs.load_progress(engine.home.log_dir(name), activity(engine.ref(row)))
                    if probe.status == health.LOADING
                    else None,
                )
                watches[name] = s.watch
                if s.state != row.state:
                    engine.store.set_state(row, s.state, s.reason, {"probe": probe.to_json()})
                healthy, loading = s.healthy, probe.status == health.LOADING
            else:
                healthy, loading = row.state == S.HEALTHY, row.state == S.STARTING
            if healthy:
                res.healthy = True
                del pending[name]
                if on_progress:
                    on_progress(name, "healthy", elapsed, "")
            elif on_progress:
                on_progress(
                    name, "loading" if loading else "starting", elapsed, _said(engine, name)
                )
        if not pending:
            break
        if elapsed >= timeout:
            for name, res in pending.items():
                if res.pid is None:
                    res.error = (
                        f"Instance '{name}' was still waiting for its turn to load after "
                        f"{timeout:g}s (loads.max_concurrent); the daemon starts it when the "
                        "models before it have loaded. Raise --timeout to wait for it."
                    )
                    continue
                tail = logs.server_lines(logs.log_file(engine.home.log_dir(name), "stderr"), 10)
                res.error = with_tail(
                    f"Instance '{name}' was not healthy within {timeout:g}s; it keeps "
                    f"starting in the background. See `llama-orch logs {name}`, or raise --timeout.",
                    tail,
                )
            break
        time.sleep(POLL_INTERVAL if probed else STATE_POLL_INTERVAL)


def _said(engine: Engine, name: str) -> str:
    """What a starting server said last: its load progress while llama.cpp
    prints its dots, else its last line."""
    log_dir = engine.home.log_dir(name)
    percent = logs.load_progress(log_dir).percent
    if percent is not None and percent < 100:
        return f"{percent}% of the model read"
    last = logs.server_lines(logs.log_file(log_dir, "stderr"), 1)
    return last[0] if last else ""


def _death_message(engine: Engine, name: str, row: InstanceRow) -> str:
    info = row.last_exit or {}
    message = f"Instance '{name}' {exit_text(info)} while starting."
    if row.state == S.BACKOFF and row.next_restart_at is not None:
        wait = max(0.0, row.next_restart_at - engine.clock())
        message += f" The daemon tries again in {wait:.1f}s (restart {row.restarts})."
    elif row.state in RUNNING_STATES:
        message += f" The daemon restarted it (restart {row.restarts}, pid {row.pid})."
    elif row.state == S.FAILED:
        message += f" It failed {row.restarts} restarts in a row; the daemon gave up."
    return with_tail(message, (info.get("stderr_tail") or [])[-10:])
