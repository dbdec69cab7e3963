"""One health step: what one probe of a running instance means (DESIGN §4), pure.

    step(state, desired, started_at, watch, probe, hc, mode, now) -> Step

The daemon's instance runner calls it after every probe; the daemonless
`up --wait` calls it for the instances it started itself. `ps` and
`describe` never call it to write: what they see is a view (see
`engine.status.observed_state`), not a verdict.

`Watch` is what the step remembers of a run between probes (consecutive
failures, when a failure last counted); it belongs to whoever owns the run,
and a new run starts with a new one. Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llama_orchestrator.engine import health
from llama_orchestrator.engine.health import ProbeResult
from llama_orchestrator.engine.logs import LoadProgress
from llama_orchestrator.engine.policy import after_probe
from llama_orchestrator.states import Desired
from llama_orchestrator.states import InstanceState as S

if TYPE_CHECKING:
    from llama_orchestrator.config.instance import HealthcheckSection

__all__ = ["Watch", "Step", "step"]


@dataclass(frozen=True)
class Watch:
    """What the health step remembers about one run."""

    #: when the run began (or was adopted): the reference for `early`
    since: float
    failures: int = 0
    #: the last probe whose failure counted (or `since`)
    counted_at: float | None = None
    #: how the load stood when it last progressed (or was first looked at),
    #: and when that was (a load that progresses is no failure: see `after_probe`)
    marks: LoadProgress | None = None
    progress_at: float | None = None


@dataclass(frozen=True)
class Step:
    state: S  # STARTING, HEALTHY or UNHEALTHY
    watch: Watch
    reason: str
    #: stop the process for failing its checks; its exit decides what follows
    restart: bool = False

    @property
    def healthy(self) -> bool:
        return self.state == S.HEALTHY


def step(
    state: S,
    desired: Desired,
    started_at: float | None,
    watch: Watch,
    probe: ProbeResult,
    hc: HealthcheckSection,
    mode: str,
    now: float,
    progress: LoadProgress | None = None,
) -> Step:
    """Apply one probe made at `now` to a run in `state`; `progress`: what
    its logs said of the load meanwhile (None: not looked at).

    A probe sooner than `interval` after the last one that counted is
    *early* (a starting instance is looked at often, so that it is seen
    healthy soon): it can make the instance healthy, but its failure does
    not count, or a server would get `retries` x 50 ms to listen rather
    than `retries` x interval."""
    if probe.status == health.LOCAL:  # our fault (no descriptor left ...): not the server's
        return Step(state, watch, "", False)
    last = watch.counted_at if watch.counted_at is not None else watch.since
    early = state == S.STARTING and now - last < hc.interval
    marks, progress_at = watch.marks, watch.progress_at
    if progress is not None and (marks is None or progress.beyond(marks)):
        # the first look is the baseline; progress beyond it moves it on
        marks, progress_at = progress, (None if marks is None else now)
    # seconds since the load last progressed (since the run began, if never)
    stalled = (
        math.inf if marks is None else now - (watch.since if progress_at is None else progress_at)
    )
    verdict = after_probe(
        hc,
        mode,
        desired,
        state,
        watch.failures,
        probe.status,
        now - (started_at if started_at is not None else now),
        probe.error or "",
        early,
        stalled,
    )
    counted_at = last if early else now
    return Step(
        verdict.state,
        Watch(watch.since, verdict.failures, counted_at, marks, progress_at),
        verdict.reason,
        verdict.restart,
    )
