"""On-demand instances (issue 9): what to stop so that one can start, and
when an idle one stops (pure: the daemon passes in the facts and the clock).

An on-demand instance starts when a request names it. Before it starts it
must fit: on each device it is pinned to, the VRAM it needs (the estimate,
or `gpu.vram_mib`) next to what runs there, by the estimates of what runs
and, when the card reports it, by the card's live free memory (the smaller
of the two: the card also counts what is not ours, the estimates also count
what is still loading). And its group may run at most `max_running` members.
To make room the least recently used *idle* on-demand instances go first;
an instance with a request in flight, one still starting, and an always-on
instance are never stopped. When nothing can be freed the start waits.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from llama_orchestrator.engine.policy import idle_left
from llama_orchestrator.units import human_bytes

__all__ = ["Member", "StartPlan", "plan_start", "idle_due"]


@dataclass(frozen=True)
class Member:
    """An instance as the swap decision sees it."""

    name: str
    on_demand: bool
    running: bool  # a process exists (starting, healthy, unhealthy, stopping)
    busy: bool = False  # requests in flight or waiting for it, or being started
    last_used: float = 0.0  # when its last request ended (or it started)
    demand: Mapping[int, int] = field(default_factory=dict)  # bytes per pinned device
    group: str | None = None


@dataclass(frozen=True)
class StartPlan:
    """Stop `stop` (in order, each with its reason), then start; or, when
    `wait` is set, nothing can be done yet and `wait` says why."""

    stop: tuple[tuple[str, str], ...] = ()
    wait: str | None = None


def plan_start(
    target: Member,
    others: Iterable[Member],
    total: Mapping[int, int],
    free: Mapping[int, int] | None = None,
    max_running: Mapping[str, int] | None = None,
) -> StartPlan:
    """How `target` can start next to `others`.

    `total`: each known card's memory in bytes; `free`: what the cards report
    free now (devices missing from it: estimates alone). A device missing
    from `total` (no card reported) is not checked."""
    running = [m for m in others if m.running and m.name != target.name]
    stoppable = sorted(
        (m for m in running if m.on_demand and not m.busy),
        key=lambda m: (m.last_used, m.name),
    )
    chosen: list[tuple[str, str]] = []
    gone: set[str] = set()

    def stop(m: Member, reason: str) -> None:
        chosen.append((m.name, reason))
        gone.add(m.name)

    # the group first: its limit holds whatever the memory says
    group = target.group
    limit = (max_running or {}).get(group, 1) if group else None
    if group is not None and limit is not None:
        members = [m for m in running if m.group == group]
        excess = len(members) - limit + 1
        for m in [s for s in stoppable if s.group == group][: max(0, excess)]:
            stop(m, f"swapped out for {target.name}: group '{group}' runs at most {limit}")
            excess -= 1
        if excess > 0:
            busy = ", ".join(m.name for m in members if m.name not in gone)
            return StartPlan(
                wait=f"group '{group}' runs at most {limit} at once and {busy} "
                f"{'is' if len(members) - len(gone) == 1 else 'are'} busy"
            )

    def available(device: int) -> int:
        by_estimate = total[device] - sum(
            m.demand.get(device, 0) for m in running if m.name not in gone
        )
        if free is not None and device in free:
            # the card's view; what we stop gives back what we estimated for it
            freed = sum(m.demand.get(device, 0) for m in running if m.name in gone)
            return min(by_estimate, free[device] + freed)
        return by_estimate

    def short() -> list[int]:
        return [
            d for d, need in sorted(target.demand.items()) if d in total and need > available(d)
        ]

    for device in short():
        need = target.demand[device]
        for m in stoppable:
            if available(device) >= need:
                break
            if m.name in gone or device not in m.demand:
                continue
            stop(
                m,
                f"swapped out for {target.name}: {human_bytes(need)} needed on GPU {device}, "
                f"{human_bytes(max(0, available(device)))} free",
            )
    missing = short()
    if missing:
        d = missing[0]
        return StartPlan(
            wait=f"{target.name} needs {human_bytes(target.demand[d])} on GPU {d} and only "
            f"{human_bytes(max(0, available(d)))} can be freed now (instances with requests "
            "in flight and always-on instances are never stopped)"
        )
    return StartPlan(stop=tuple(chosen))


def idle_due(members: Iterable[Member], idle_ttl: Mapping[str, float], now: float) -> list[str]:
    """The running on-demand instances whose idle time is up."""
    return [
        m.name
        for m in members
        if m.on_demand
        and m.running
        and m.name in idle_ttl
        and idle_left(m.last_used, idle_ttl[m.name], m.busy, now) == 0.0
    ]
