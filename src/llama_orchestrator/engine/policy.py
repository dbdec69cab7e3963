"""Restart policy and backoff (DESIGN §4): pure decisions with an injected clock.

The supervisor daemon (issue 3) calls `after_exit` when an instance's process
ends or is declared unhealthy, and `after_start` when it starts one; nothing
here does I/O or reads a clock.

    delay = min(backoff_max, backoff_initial * 2**n) * (1 +/- 10 %)

where n counts restarts since the instance last stayed up `reset_after`
seconds. After `max_retries` restarts in a row it is `failed` and stays down
until `up` or `restart` (`RestartBook.fresh()`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from llama_orchestrator.config import RestartPolicySection
from llama_orchestrator.states import Desired
from llama_orchestrator.states import InstanceState as S

__all__ = [
    "Ending",
    "RestartBook",
    "Decision",
    "wants_restart",
    "backoff_delay",
    "after_start",
    "after_exit",
]

JITTER = 0.10


@dataclass(frozen=True)
class Ending:
    """How a run ended: an exit code, a signal, or a failed health check."""

    code: int | None = None
    signal: int | None = None
    unhealthy: bool = False

    @property
    def failed(self) -> bool:
        return (
            self.unhealthy or self.signal is not None or (self.code is not None and self.code != 0)
        )


@dataclass(frozen=True)
class RestartBook:
    """What the policy remembers about one instance."""

    restarts: int = 0  # total, shown by ps
    streak: int = 0  # restarts since the instance last stayed up reset_after seconds
    up_since: float | None = None

    @classmethod
    def fresh(cls, restarts: int = 0) -> RestartBook:
        """After a user's `up`/`restart`: a failed instance gets its budget back."""
        return cls(restarts=restarts)


@dataclass(frozen=True)
class Decision:
    state: S  # BACKOFF (restart at `restart_at`), EXITED, STOPPED or FAILED
    book: RestartBook
    restart_at: float | None = None
    reason: str = ""


def wants_restart(mode: str, ending: Ending, desired: Desired) -> bool:
    """Docker's semantics: `no` never; `on-failure` after a failure; `always`
    and `unless-stopped` whenever it ends; none of them after a user's down."""
    if desired == Desired.STOPPED or mode == "no":
        return False
    if mode == "on-failure":
        return ending.failed
    return mode in ("always", "unless-stopped")


def backoff_delay(policy: RestartPolicySection, n: int, jitter: float) -> float:
    """Seconds before restart number n+1; `jitter` in [-1, 1] (the caller's random draw)."""
    base = min(policy.backoff_max, policy.backoff_initial * (2 ** min(n, 62)))
    return base * (1 + JITTER * max(-1.0, min(1.0, jitter)))


def after_start(book: RestartBook, now: float) -> RestartBook:
    return replace(book, up_since=now)


def after_exit(
    policy: RestartPolicySection,
    book: RestartBook,
    ending: Ending,
    desired: Desired,
    now: float,
    jitter: float,
) -> Decision:
    """What happens when a run ends at `now`."""
    streak = book.streak
    if book.up_since is not None and now - book.up_since >= policy.reset_after:
        streak = 0  # it stayed up long enough: this is a new incident, not a crash loop
    book = replace(book, streak=streak, up_since=None)
    if desired == Desired.STOPPED:
        return Decision(S.STOPPED, book, reason="stopped by the user")
    if not wants_restart(policy.effective_mode, ending, desired):
        return Decision(S.EXITED, book, reason=f"restart policy {policy.effective_mode}")
    if streak >= policy.max_retries:
        return Decision(
            S.FAILED,
            book,
            reason=f"{streak} restarts in a row without staying up {policy.reset_after:g}s",
        )
    delay = backoff_delay(policy, streak, jitter)
    book = replace(book, restarts=book.restarts + 1, streak=streak + 1)
    return Decision(S.BACKOFF, book, now + delay, f"restart {streak + 1} in {delay:.2f}s")
