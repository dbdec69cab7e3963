"""External upstreams (OpenAI-compatible APIs that are not processes of
ours): the decisions, pure and with the clock passed in.

The daemon checks each one (`daemon.upstreams`) and the router sends it
requests like any replica, within its limits: `max_concurrent` is its
slots; `requests_per_minute` and the daily budget refuse with 429 and a
Retry-After (`RateWindow`, `Spending`). Every answer's `usage`, streamed
or not, is what it cost (`UsageMeter`, `cost`).

The key is read from the environment or its file at each request
(`api_key`), so it is never in a config, the database, an event or argv.
"""

from __future__ import annotations

import json
import os
import re
from collections import deque
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_orchestrator.config.upstream import UpstreamConfig
from llama_orchestrator.errors import OrchError

__all__ = [
    "KeyMissing",
    "read_key",
    "api_key",
    "key_env_names",
    "RateWindow",
    "Spending",
    "UsageMeter",
    "Usage",
    "cost",
    "for_upstream",
    "check_delay",
    "redact",
    "usage_summary",
    "DAY_S",
]

DAY_S = 86400.0
#: the longest wait between the checks of an upstream that keeps failing
MAX_CHECK_DELAY_S = 600.0


class KeyMissing(OrchError):
    """The upstream's key is not where its config says."""


def api_key(
    name: str, cfg: UpstreamConfig, config_dir: Path, env: Mapping[str, str] = os.environ
) -> str | None:
    """The key to send (None: the upstream needs none); raises KeyMissing."""
    u = cfg.upstream
    return read_key(f"upstream '{name}'", u.api_key_env, u.api_key_file, config_dir, env)


def read_key(
    what: str,
    env_name: str | None,
    file: str | None,
    folder: Path,
    env: Mapping[str, str] = os.environ,
) -> str | None:
    """A key from the daemon's environment or from a file (relative to
    `folder`), read now; None when neither is named. Raises KeyMissing."""
    if env_name:
        key = env.get(env_name, "").strip()
        if not key:
            raise KeyMissing(
                f"The key of {what} is not set: the daemon has no ${env_name}.",
                hint=f"Set {env_name} where the daemon starts (its service unit, or the "
                "shell of `daemon start`), then `llama-orch daemon stop` and `up`.",
            )
        return key
    if file:
        path = (folder / file).expanduser()
        try:
            key = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise KeyMissing(
                f"The key of {what} cannot be read from {path} ({exc.strerror}).",
                hint=f"Write the key to {path}.",
            ) from None
        if not key:
            raise KeyMissing(f"The key file {path} of {what} is empty.")
        return key
    return None


def key_env_names(upstreams: Mapping[str, UpstreamConfig]) -> set[str]:
    """The variables that hold upstream keys: left out of llama-server's
    environment (it needs none of them, and `describe` shows its environment)."""
    return {u.upstream.api_key_env for u in upstreams.values() if u.upstream.api_key_env}


class RateWindow:
    """`requests_per_minute` as a sliding window of the last minute's requests."""

    def __init__(self, per_minute: float | None) -> None:
        self.limit = per_minute
        self._times: deque[float] = deque()

    def wait(self, now: float) -> float:
        """Seconds until one more request may go (0: now)."""
        if self.limit is None:
            return 0.0
        while self._times and self._times[0] <= now - 60.0:
            self._times.popleft()
        if len(self._times) < self.limit:
            return 0.0
        return max(0.001, self._times[-int(self.limit)] + 60.0 - now)

    def take(self, now: float) -> None:
        if self.limit is not None:
            self._times.append(now)


class Spending:
    """What each upstream cost in the last 24 hours, against its budget."""

    def __init__(self) -> None:
        self._spent: dict[str, deque[tuple[float, float]]] = {}

    def add(self, name: str, ts: float, amount: float) -> None:
        if amount > 0:
            self._spent.setdefault(name, deque()).append((ts, amount))

    def spent(self, name: str, now: float) -> float:
        q = self._spent.get(name)
        if not q:
            return 0.0
        while q and q[0][0] <= now - DAY_S:
            q.popleft()
        return sum(a for _, a in q)

    def over(self, name: str, budget: float | None, now: float) -> float:
        """Seconds until it is under its budget again (0: it is)."""
        if budget is None or self.spent(name, now) < budget:
            return 0.0
        q = self._spent[name]
        left, total = 0.0, sum(a for _, a in q)
        for ts, amount in q:  # the oldest spending leaves the window first
            total -= amount
            left = ts + DAY_S - now
            if total < budget:
                break
        return max(1.0, left)


@dataclass(frozen=True)
class Usage:
    tokens_in: int
    tokens_out: int


def cost(cfg: UpstreamConfig, usage: Usage) -> float:
    p = cfg.upstream.price
    return (usage.tokens_in * p.input_per_mtok + usage.tokens_out * p.output_per_mtok) / 1e6


def _usage(data: Any) -> Usage | None:
    u = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(u, dict):
        return None
    tin, tout = u.get("prompt_tokens"), u.get("completion_tokens")
    if not isinstance(tin, int) and not isinstance(tout, int):
        return None
    return Usage(tin if isinstance(tin, int) else 0, tout if isinstance(tout, int) else 0)


class UsageMeter:
    """The `usage` of an answer as it passes: a JSON body whole, or an event
    stream chunk by chunk (its last `usage` counts: the final chunk's)."""

    def __init__(self, streamed: bool) -> None:
        self.streamed = streamed
        self.usage: Usage | None = None
        self._rest = b""
        self._body = bytearray()

    def feed(self, chunk: bytes) -> None:
        if not self.streamed:
            self._body += chunk
            return
        lines = (self._rest + chunk).split(b"\n")
        self._rest = lines.pop()
        for line in lines:
            self._line(line)

    def _line(self, line: bytes) -> None:
        line = line.strip()
        if not line.startswith(b"data:") or b'"usage"' not in line:
            return
        try:
            found = _usage(json.loads(line[5:]))
        except ValueError:
            return
        if found is not None:
            self.usage = found

    def done(self) -> Usage | None:
        if self.streamed:
            self._line(self._rest)
            self._rest = b""
        else:
            try:
                self.usage = _usage(json.loads(self._body))
            except ValueError:
                self.usage = None
        return self.usage


def for_upstream(body: bytes, remote_model: str) -> tuple[bytes, bool]:
    """A request's JSON body as the upstream gets it: its model name, and a
    streamed request asks for the usage in its last chunk (OpenAI's
    `stream_options`); and whether it streams."""
    try:
        data = json.loads(body)
    except ValueError:
        return body, False
    if not isinstance(data, dict):
        return body, False
    data["model"] = remote_model
    streamed = data.get("stream") is True
    if streamed:
        opts = data.get("stream_options")
        data["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
    return json.dumps(data).encode(), streamed


def check_delay(interval: float, failures: int) -> float:
    """When the next check of an upstream is due: every `interval` while it
    answers; after failures, doubling up to MAX_CHECK_DELAY_S (never below
    `interval`), so a dead API is not hammered."""
    if failures <= 0:
        return interval
    return max(interval, min(MAX_CHECK_DELAY_S, interval * 2.0 ** (failures - 1)))


#: what keys look like: OpenAI/Anthropic-style sk-..., Hugging Face hf_..., a bearer token
_KEYISH = re.compile(
    r"\b(?:sk-[A-Za-z0-9_-]{16,}|sk-ant-[A-Za-z0-9_-]{16,}|hf_[A-Za-z0-9]{20,})|"
    r"(?i:bearer\s+)[A-Za-z0-9._~+/=-]{12,}"
)


def redact(text: str, keys: Collection[str] = ()) -> str:
    """`text` with the keys given (the upstreams' own) and anything shaped
    like a key replaced by ********."""
    for key in keys:
        if key and len(key) >= 4:
            text = text.replace(key, "********")
    return _KEYISH.sub("********", text)


def usage_summary(records: Iterable[Any]) -> dict[str, Any]:
    """`llama-orch usage`: requests, tokens and cost summed by upstream, model
    and plan run (None: a client's request), and in all (pure)."""
    groups: dict[tuple[str, str, str | None], dict[str, Any]] = {}
    total = {"requests": 0, "tokens_in": 0, "tokens_out": 0, "cost": 0.0}
    for r in records:
        key = (r.upstream, r.model, r.run_id)
        g = groups.setdefault(
            key,
            {"upstream": r.upstream, "model": r.model, "plan_run": r.run_id}
            | {k: 0 for k in total},
        )
        for sums in (g, total):
            sums["requests"] += 1
            sums["tokens_in"] += r.tokens_in
            sums["tokens_out"] += r.tokens_out
            sums["cost"] += r.cost
    rows = [groups[k] for k in sorted(groups, key=lambda k: (k[0], k[1], k[2] or ""))]
    for sums in (*rows, total):
        sums["cost"] = round(sums["cost"], 6)
    return {"rows": rows, "total": total}
