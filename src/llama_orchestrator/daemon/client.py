"""The CLI's side of the control API: a small HTTP client over the daemon's
unix socket (Windows: 127.0.0.1 + token), and `Supervised`, which offers the
engine's up/down/restart/rm by asking the daemon to do them.

The standard library's http.client is enough for one request per command and
keeps httpx's import (~170 ms) out of every `up`. What is said is typed in
`daemon.protocol`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from llama_orchestrator import platform
from llama_orchestrator.daemon.info import DaemonInfo
from llama_orchestrator.daemon.protocol import (
    Activity,
    CancelReply,
    DownReply,
    DownRequest,
    PlanReply,
    PlanRequest,
    RestartRequest,
    RetryReply,
    RmRequest,
    StatusReply,
    UpReply,
    UpRequest,
    error_from_json,
    error_to_json,
)
from llama_orchestrator.engine.lifecycle import Engine
from llama_orchestrator.engine.results import Progress, UpResult
from llama_orchestrator.engine.wait import finish_up
from llama_orchestrator.errors import OrchError

__all__ = ["DaemonClient", "Supervised", "error_from_json", "error_to_json", "copy_logs"]

#: the Host header our client sends; the API accepts only loopback names and this
HOST = "llama-orch"
#: how long `ps` waits for the daemon's view before it makes its own
STATUS_TIMEOUT = 3.0


class _Connection(http.client.HTTPConnection):
    def __init__(self, info: DaemonInfo, timeout: float) -> None:
        super().__init__(HOST if info.transport == "unix" else "127.0.0.1", info.port, timeout)
        self._info = info

    def connect(self) -> None:
        if self._info.transport == "unix":
            self.sock = platform.connect_control(Path(self._info.socket or ""), self.timeout or 30)
        else:
            super().connect()


class DaemonClient:
    def __init__(self, info: DaemonInfo, timeout: float = 600) -> None:
        self.info = info
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """One request; the JSON answer, or the daemon's error raised as ours."""
        conn = _Connection(self.info, self.timeout)
        headers = {"Content-Type": "application/json"}
        if self.info.token:
            headers["Authorization"] = f"Bearer {self.info.token}"
        if is_dataclass(body):
            body = asdict(body)  # type: ignore[arg-type]
        payload = json.dumps(body).encode() if body is not None else None
        try:
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (TimeoutError, OSError, http.client.HTTPException) as exc:
            raise OrchError(
                f"The llama-orch daemon (pid {self.info.pid}) did not answer at "
                f"{self.info.address}: {exc}.",
                hint="`llama-orch daemon status` shows it; `llama-orch daemon stop` and "
                "`daemon start` restart it (instances keep running).",
            ) from exc
        finally:
            conn.close()
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = None
        if resp.status >= 400:
            if isinstance(data, dict) and isinstance(data.get("error"), dict):
                raise error_from_json(data["error"])
            raise OrchError(f"The daemon answered {path} with HTTP {resp.status}: {raw[:200]!r}.")
        return data


class Supervised:
    """The `Control` of a home whose daemon runs: up/down/restart/rm carried
    out by the daemon, so that it becomes the parent of the instances it
    starts (instant exit detection, exit codes) and supervises them; waiting
    for health reads the state the daemon writes. Plans run there too."""

    def __init__(self, engine: Engine, info: DaemonInfo) -> None:
        self.engine = engine
        self.client = DaemonClient(info)

    def up(
        self,
        names: list[str],
        *,
        wait: bool = True,
        timeout: float = 300,
        on_progress: Progress | None = None,
        strict: bool = False,
    ) -> list[UpResult]:
        answer = self.client.call("POST", "/v1/up", UpRequest(names, strict))
        return self._finish(UpReply.from_json(answer), wait, timeout, on_progress)

    def restart(
        self,
        names: list[str],
        *,
        timeout: float = 300,
        on_progress: Progress | None = None,
        rolling: bool = False,
    ) -> list[UpResult]:
        """`rolling`: the daemon restarts them one at a time, each drained by
        the router first and healthy again before the next."""
        answer = self.client.call("POST", "/v1/restart", RestartRequest(names, rolling))
        return self._finish(UpReply.from_json(answer), True, timeout, on_progress)

    def _finish(
        self, reply: UpReply, wait: bool, timeout: float, on_progress: Progress | None
    ) -> list[UpResult]:
        return finish_up(self.engine, reply.results, wait, timeout, on_progress)

    def down(self, names: list[str], timeout: float | None = None) -> list[str]:
        answer = self.client.call("POST", "/v1/down", DownRequest(names, timeout))
        return DownReply(**answer).stopped

    def rm(self, name: str, force: bool = False) -> None:
        self.client.call("POST", "/v1/rm", RmRequest(name, force))

    def status(self) -> StatusReply:
        """The daemon's view, or, when it does not answer within STATUS_TIMEOUT
        (a stalled loop) or is older than this CLI, the same view made here
        from the state database: `ps` must never hang on, or fail with, the daemon."""
        try:
            answer = DaemonClient(self.client.info, timeout=STATUS_TIMEOUT).call(
                "GET", "/v1/instances"
            )
            return StatusReply(**answer)
        except OrchError:
            from llama_orchestrator.engine.views import status_reply

            return status_reply(self.engine)

    def activity(self) -> Activity:
        """The daemon's load queue and requests in flight (none when it does
        not answer in time: this is a view)."""
        try:
            answer = DaemonClient(self.client.info, timeout=STATUS_TIMEOUT).call(
                "GET", "/v1/activity"
            )
        except OrchError:
            return Activity()
        return Activity(**answer)

    def submit_plan(self, path: Path, text: str, given_vars: dict[str, str]) -> PlanReply:
        source = path.resolve()
        body = PlanRequest(text, str(source), str(source.parent), given_vars)
        return PlanReply(**self.client.call("POST", "/v1/plans", body))

    def cancel_plan(self, run_id: str) -> CancelReply:
        return CancelReply(**self.client.call("POST", f"/v1/plans/{run_id}/cancel"))

    def retry_plan(self, run_id: str) -> RetryReply:
        return RetryReply(**self.client.call("POST", f"/v1/plans/{run_id}/retry"))


def copy_logs(info: DaemonInfo | None, name: str, timeout: float = 15.0) -> None:
    """Have the daemon copy a cluster node's logs of `name` into the home
    before they are read; a daemon that does not answer leaves the copy as
    it is (`logs` reads what is there)."""
    from llama_orchestrator.daemon.protocol import LogsRequest

    if info is None:
        return
    with contextlib.suppress(OrchError):
        DaemonClient(info, timeout=timeout).call("POST", "/v1/logs", LogsRequest([name]))
