"""Health verdicts, restart policy and backoff (DESIGN §4): pure decisions.

The supervisor daemon calls `after_probe` with each health-check result,
`after_exit` when an instance's process ends (or was stopped for being
unhealthy), and `after_start` when it starts one. Nothing here does I/O or
reads a clock: the caller passes `now`, ages and its random draw.

    delay = min(backoff_max, backoff_initial * 2**n) * (1 +/- 10 %)

where n counts restarts since the instance last stayed up `reset_after`
seconds. After `max_retries` restarts in a row it is `failed` and stays down
until `up` or `restart` (`RestartBook.fresh()`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from llama_orchestrator.engine.health import DOWN, HEALTHY, LOADING
from llama_orchestrator.states import Desired
from llama_orchestrator.states import InstanceState as S

if TYPE_CHECKING:  # types only: a CLI command that never reads a config skips pydantic
    from llama_orchestrator.config.instance import HealthcheckSection, RestartPolicySection

__all__ = [
    "Ending",
    "fatal_reason",
    "RestartBook",
    "Decision",
    "wants_restart",
    "backoff_delay",
    "after_start",
    "after_exit",
    "Verdict",
    "after_probe",
    "idle_left",
]

JITTER = 0.10


#: llama-server's words when it cannot load its model: a restart would load
#: the same file the same way, so it is not retried
_LOAD_FAILURE = ("exiting due to model loading error", "failed to load model")
#: ggml's words when a buffer does not fit (CUDA, ROCm/HIP, Vulkan, Metal, host
#: memory): the same layers and context will not fit after a restart either
_OUT_OF_MEMORY = (
    "out of memory",
    "outofdevicememory",
    "outofhostmemory",
    "cudamalloc failed",
    "hipmalloc failed",
    "unable to allocate",
    "failed to allocate buffer",
)
#: llama-server's words for a flag it does not know (or one argument holding
#: several): every restart would be refused the same way
_BAD_ARGUMENT = "error: invalid argument:"
#: llama.cpp's line prefix: time since its start, and the level letter
_PREFIX = re.compile(r"^(?:\d+\.\d+\.\d+\.\d+ )?(?:[DIWE] )?")


def fatal_reason(stderr_tail: list[str]) -> str | None:
    """Why an exit will repeat on every restart, and the fix, from its last
    stderr lines (pure); None when a restart may well help."""
    oom = next((ln for ln in stderr_tail if any(m in ln.lower() for m in _OUT_OF_MEMORY)), None)
    if oom is not None:
        detail = _PREFIX.sub("", oom.strip())[:200]
        return (
            f"llama-server ran out of memory loading its model ({detail}): lower "
            "gpu.layers (-ngl) or model.context_size, or set gpu.vram_mib to what the card "
            "can give it, then `up` it again"
        )
    bad = next((ln for ln in stderr_tail if _BAD_ARGUMENT in ln), None)
    if bad is not None:
        what = bad.split(_BAD_ARGUMENT, 1)[1].strip()[:200]
        return (
            f"llama-server refused its arguments (invalid argument: {what}): fix "
            "server.extra_args (one flag or value per list item), then `up` it again"
        )
    text = "\n".join(stderr_tail).lower()
    if any(marker in text for marker in _LOAD_FAILURE):
        detail = next(
            (
                ln.split("error loading model:", 1)[1].strip()
                for ln in stderr_tail
                if "error loading model:" in ln
            ),
            "",
        )
        return (
            "llama-server could not load its model"
            + (f" ({detail})" if detail else "")
            + ": fix the model (or its path), then `up` it again"
        )
    return None


@dataclass(frozen=True)
class Ending:
    """How a run ended: an exit code, a signal, or a failed health check; `fatal`
    says why it would end the same way after a restart."""

    code: int | None = None
    signal: int | None = None
    unhealthy: bool = False
    fatal: str | None = None

    @property
    def failed(self) -> bool:
        """A non-zero code, a signal, a failed health check, or an unknown end
        (a process that was not our child: nobody can tell, so assume the worst)."""
        if self.unhealthy or self.signal is not None:
            return True
        return self.code != 0

    @classmethod
    def of(cls, last_exit: dict[str, object] | None) -> Ending:
        """From a `last_exit` record (see Engine.observe)."""
        info = last_exit or {}
        code, sig = info.get("code"), info.get("signal")
        tail = info.get("stderr_tail")
        fatal = (
            fatal_reason([str(x) for x in tail])
            if isinstance(code, int) and code != 0 and isinstance(tail, list)
            else None
        )
        return cls(
            code if isinstance(code, int) else None,
            sig if isinstance(sig, int) else None,
            fatal=fatal,
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
    if ending.fatal:
        return Decision(
            S.FAILED, book, reason=f"{ending.fatal} (not restarted: it would fail the same way)"
        )
    if streak >= policy.max_retries:
        return Decision(
            S.FAILED,
            book,
            reason=f"{streak} restarts in a row without staying up {policy.reset_after:g}s",
        )
    delay = backoff_delay(policy, streak, jitter)
    book = replace(book, restarts=book.restarts + 1, streak=streak + 1)
    return Decision(S.BACKOFF, book, now + delay, f"restart {streak + 1} in {delay:.2f}s")


@dataclass(frozen=True)
class Verdict:
    """What one health-check result means for a running instance."""

    state: S  # STARTING, HEALTHY or UNHEALTHY
    failures: int  # consecutive failures counted so far
    restart: bool = False  # stop it now and let `after_exit` decide what follows
    reason: str = ""


def after_probe(
    hc: HealthcheckSection,
    mode: str,
    desired: Desired,
    state: S,
    failures: int,
    status: str,
    age: float,
    detail: str = "",
    early: bool = False,
    stalled: float = math.inf,
) -> Verdict:
    """Docker's health semantics for one probe `status` (health.HEALTHY, ...)
    of a run that is `age` seconds old.

    While an instance has not been healthy yet and is within `start_period`,
    failures do not count (a model loading answers 503; a server not yet
    listening refuses). After that, `retries` failures in a row make it
    unhealthy, and an unhealthy instance is restarted when its policy says so.

    `early`: a probe made sooner than `interval` after the last one that
    counted (a starting instance is looked at often, so that it is seen
    healthy soon): it can make the instance healthy, but its failure does not
    count, or a server would get `retries` x 50 ms to listen, not x interval.

    A load is not a failure while it progresses: past `start_period`, a
    server that still answers 503 "loading" keeps `starting` as long as its
    logs grew in the last `load_timeout` seconds (`stalled`: seconds since
    they last did; infinite when nobody looked).
    """
    if status == HEALTHY:
        return Verdict(S.HEALTHY, 0, reason="answered /health with 200")
    what = detail or status
    if state == S.STARTING and (early or age < hc.start_period):
        why = (
            "model loading"
            if status == LOADING
            else "not listening yet"
            if status == DOWN
            else what
        )
        return Verdict(S.STARTING, 0 if age < hc.start_period else failures, reason=why)
    if state == S.STARTING and status == LOADING and stalled < hc.load_timeout:
        return Verdict(S.STARTING, 0, reason="model loading (past start_period, still progressing)")
    failures += 1
    if failures < hc.retries:
        return Verdict(
            state, failures, reason=f"health check failed ({what}), {failures} of {hc.retries}"
        )
    reason = f"{failures} health checks failed in a row (last: {what})"
    restart = state != S.UNHEALTHY and wants_restart(mode, Ending(unhealthy=True), desired)
    return Verdict(S.UNHEALTHY, failures, restart, reason)


def idle_left(last_used: float, idle_ttl: float, busy: bool, now: float) -> float | None:
    """Seconds until an on-demand instance's idle stop is due (0: due now); None while busy: the
    idle clock counts from the end of the last request and never runs during one."""
    if busy:
        return None
    return max(0.0, idle_ttl - (now - last_used))
