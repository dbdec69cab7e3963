"""The CLI's side of the control API: a small HTTP client over the daemon's
unix socket (Windows: 127.0.0.1 + token), and `Supervised`, which offers the
engine's up/down/restart/rm by asking the daemon to do them.

The standard library's http.client is enough for one request per command and
keeps httpx's import (~170 ms) out of every `up`.
"""

from __future__ import annotations

import http.client
import json
from typing import Any

from llama_orchestrator import platform
from llama_orchestrator.daemon.info import DaemonInfo
from llama_orchestrator.engine.lifecycle import Engine, Progress, UpResult
from llama_orchestrator.errors import (
    ConfigError,
    OrchError,
    Problem,
    StartFailed,
    UserError,
)

__all__ = ["DaemonClient", "Supervised", "error_from_json", "error_to_json"]

#: the Host header our client sends; the API accepts only loopback names and this
HOST = "llama-orch"


class _Connection(http.client.HTTPConnection):
    def __init__(self, info: DaemonInfo, timeout: float) -> None:
        super().__init__(HOST if info.transport == "unix" else "127.0.0.1", info.port, timeout)
        self._info = info

    def connect(self) -> None:
        if self._info.transport == "unix":
            from pathlib import Path

            self.sock = platform.connect_control(Path(self._info.socket or ""), self.timeout or 30)
        else:
            super().connect()


def error_to_json(exc: OrchError) -> dict[str, Any]:
    out: dict[str, Any] = {
        "kind": type(exc).__name__,
        "message": exc.message,
        "hint": exc.hint,
        "exit_code": exc.exit_code,
    }
    if isinstance(exc, ConfigError):
        out["problems"] = [p.__dict__ for p in exc.problems]
    return out


def error_from_json(data: dict[str, Any]) -> OrchError:
    """The daemon's error as the exception the local engine would have raised."""
    kind, message, hint = data.get("kind"), str(data.get("message", "")), data.get("hint")
    if kind == "ConfigError" and data.get("problems"):
        return ConfigError([Problem(**p) for p in data["problems"]])
    if kind == "StartFailed":
        return StartFailed(message, hint=hint)
    if data.get("exit_code") == 2:
        return UserError(message, hint=hint)
    return OrchError(message, hint=hint)


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
    """up/down/restart/rm carried out by the daemon, so that it becomes the
    parent of the instances it starts (instant exit detection, exit codes) and
    supervises them; waiting for health reads the state the daemon writes."""

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
        answer = self.client.call("POST", "/v1/up", {"names": names, "strict": strict})
        return self._finish(answer, wait, timeout, on_progress)

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
        answer = self.client.call("POST", "/v1/restart", {"names": names, "rolling": rolling})
        return self._finish(answer, True, timeout, on_progress)

    def _finish(
        self, answer: Any, wait: bool, timeout: float, on_progress: Progress | None
    ) -> list[UpResult]:
        results = [UpResult(**r) for r in answer["results"]]
        if wait:
            self.engine.wait_healthy(results, timeout, on_progress)
        failed = [r for r in results if r.error]
        if failed:
            raise StartFailed("\n".join(r.error for r in failed if r.error))
        return results

    def down(self, names: list[str], timeout: float | None = None) -> list[str]:
        answer = self.client.call("POST", "/v1/down", {"names": names, "timeout": timeout})
        return list(answer["stopped"])

    def rm(self, name: str, force: bool = False) -> None:
        self.client.call("POST", "/v1/rm", {"name": name, "force": force})
