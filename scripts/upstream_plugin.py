"""A pytest plugin for llama.cpp's own server tests (`tools/server/tests`),
loaded by `scripts/upstream_server_tests.py` with `-p upstream_plugin`.

It changes one thing in their harness, `utils.ServerProcess.start`/`stop`:
- the models they would download from Hugging Face (no network here) are
  our generated model (`LLAMA_ORCH_SUITE_MODEL`), in both modes;
- `LLAMA_ORCH_SUITE_MODE=routed`: instead of starting llama-server on the
  test's port, the same arguments become a llama-orch instance (an
  instance config, `llama-orch up`), and the test's port is the daemon's
  router. The tests then talk to the router exactly as they talk to
  llama-server direct. `stop` is `llama-orch daemon stop --all`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODE = os.environ.get("LLAMA_ORCH_SUITE_MODE", "direct")
MODEL = os.environ.get("LLAMA_ORCH_SUITE_MODEL", "")

#: llama-server flags that are fields of an instance config (the rest are extra_args)
_FIELDS = {
    "--model": ("model", "path"),
    "-m": ("model", "path"),
    "--alias": ("model", "alias"),
    "-a": ("model", "alias"),
    "--ctx-size": ("model", "context_size"),
    "-c": ("model", "context_size"),
    "--parallel": ("server", "parallel"),
    "-np": ("server", "parallel"),
    "--api-key": ("server", "api_key"),
    "--host": ("server", "host"),
    "--port": ("server", "port"),
    "--threads": ("model", "threads"),
    "-t": ("model", "threads"),
    "--batch-size": ("model", "batch_size"),
    "-b": ("model", "batch_size"),
}
_INTS = {"context_size", "parallel", "port", "threads", "batch_size"}


def _note(line: str) -> None:
    """Something the run's summary must say (the runner prints the file)."""
    with open(os.environ.get("LLAMA_ORCH_SUITE_NOTES", os.devnull), "a") as f:
        f.write(line + "\n")


class _Captured(Exception):
    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv, self.env = argv, env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def instance_config(argv: list[str], port: int) -> tuple[dict[str, Any], str | None]:
    """The instance config that starts llama-server as `argv` does (on
    `port`), and the API key the router must ask for (llama-server's own)."""
    cfg: dict[str, Any] = {"model": {}, "server": {}, "stop_timeout": 5}
    extra: list[str] = []
    args = argv[1:]
    i = 0
    while i < len(args):
        flag = args[i]
        if flag in _FIELDS and i + 1 < len(args):
            section, key = _FIELDS[flag]
            value: Any = args[i + 1]
            cfg[section][key] = int(value) if key in _INTS else value
            i += 2
            continue
        extra.append(flag)
        i += 1
    key = cfg["server"].get("api_key")
    cfg["server"]["port"] = port  # the test's port is the router's
    cfg["server"]["host"] = "127.0.0.1"
    cfg["model"].setdefault("context_size", 0)  # llama-server's default: the model's own
    if "parallel" not in cfg["server"]:  # llama-server's default: 4 slots, one KV cache
        cfg["server"]["parallel"] = 4
        if "-kvu" not in extra and "--kv-unified" not in extra:
            extra.append("--kv-unified")
    if "alias" not in cfg["model"]:  # llama-server names the model by its file
        cfg["model"]["alias"] = Path(cfg["model"].get("path", "model")).name
    cfg["server"]["extra_args"] = extra
    return cfg, key


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llama_orchestrator", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=180,
    )


class _Daemon:
    """One home per test process, its daemon kept while the router's
    settings stay the same (its port, host and key): a test's server is
    the instance `srv`, started by `up` and stopped by `down`, asked of
    the daemon as the CLI asks it (without a CLI process each time)."""

    def __init__(self) -> None:
        from llama_orchestrator.engine.lifecycle import Engine
        from llama_orchestrator.home import Home

        self.home = Path(tempfile.mkdtemp(prefix="llama-orch-suite-"))
        (self.home / "instances" / "srv").mkdir(parents=True)
        self.engine = Engine(Home(self.home))
        self.router: dict[str, Any] | None = None

    def start(self, cfg: dict[str, Any], router: dict[str, Any]) -> None:
        from llama_orchestrator.daemon import control
        from llama_orchestrator.daemon.info import running

        if router != self.router:
            self.close()
            (self.home / "llama-orch.json").write_text(json.dumps({"router": router}))
            self.router = router
        (self.home / "instances" / "srv" / "config.json").write_text(json.dumps(cfg))
        for log in (self.home / "logs" / "srv").glob("*.log"):
            log.unlink()  # a test reads its own server's log, as direct
        control(self.engine, True).up(["srv"], timeout=120)
        info = running(self.engine.home)
        if info is None or info.router_error:
            raise RuntimeError(f"the router is not listening: {info and info.router_error}")

    def stop(self) -> None:
        from llama_orchestrator.daemon import control

        control(self.engine, False).down(["srv"])

    def close(self) -> None:
        """The daemon stopped with its instances, and gone (the next one takes
        the home's lock): one that outlives its stop by 30 s is killed, and
        the run says so on stderr."""
        import psutil

        from llama_orchestrator.daemon.info import running

        if self.router is None:
            return
        info = running(self.engine.home)
        _cli(self.home, "daemon", "stop", "--all")
        self.router = None
        if info is None or not psutil.pid_exists(info.pid):
            return
        try:
            psutil.Process(info.pid).wait(30)
        except psutil.TimeoutExpired:
            _note(f"llama-orch daemon {info.pid} did not exit within 30 s of its stop; killed")
            psutil.Process(info.pid).kill()
        except psutil.NoSuchProcess:
            pass


_daemon: _Daemon | None = None


def pytest_unconfigure(config: Any) -> None:
    if _daemon is not None:
        _daemon.close()
        shutil.rmtree(_daemon.home, ignore_errors=True)


def pytest_configure(config: Any) -> None:
    import utils  # the suite's own harness (its rootdir is on sys.path)

    original_start = utils.ServerProcess.start
    original_stop = utils.ServerProcess.stop
    utils.ServerPreset.load_all = staticmethod(lambda: None)  # nothing to download
    routed: set[int] = set()

    def start(self: Any, timeout_seconds: int = utils.DEFAULT_HTTP_TIMEOUT) -> None:
        global _daemon
        if (self.model_hf_repo or self.model_hf_file or self.model_url) and MODEL:
            self.model_file, self.model_hf_repo, self.model_hf_file = MODEL, None, None
            self.model_url = None
        if MODE != "routed" or self.model_file is None:  # the router preset: llama-server's own
            if _daemon is not None:
                _daemon.close()  # its router holds the test's port
            return original_start(self, timeout_seconds)

        popen = utils.subprocess.Popen

        def capture(argv: list[Any], **kw: Any) -> Any:
            raise _Captured([str(a) for a in argv], dict(kw.get("env") or {}))

        utils.subprocess.Popen = capture
        try:
            original_start(self, timeout_seconds)
        except _Captured as got:
            argv, env = got.argv, got.env
        finally:
            utils.subprocess.Popen = popen
        cfg, key = instance_config(argv, _free_port())
        cfg["binary"] = argv[0]
        # what the test sets for its server (LLAMA_SERVER_DEBUG_FAKE_TIMING, AIP_MODE ...)
        cfg["env"] = {k: v for k, v in env.items() if os.environ.get(k) != v}
        if "AIP_HTTP_PORT" in cfg["env"]:  # the port it listens on is the instance's
            cfg["env"]["AIP_HTTP_PORT"] = str(cfg["server"]["port"])
        cfg["healthcheck"] = {"interval": 0.05, "start_period": 60}
        cfg["restart_policy"] = {"mode": "no"}
        router: dict[str, Any] = {"host": self.server_host, "port": self.server_port}
        if key:
            router["api_keys"] = [key]
        if _daemon is None:
            _daemon = _Daemon()
        routed.add(id(self))
        utils.server_instances.add(self)
        _daemon.start(cfg, router)
        if self.log_path:  # the test reads the server's log: it is the instance's
            Path(self.log_path).unlink(missing_ok=True)
            Path(self.log_path).symlink_to(_daemon.home / "logs" / "srv" / "stderr.log")
        deadline = time.time() + timeout_seconds
        while time.time() < deadline:
            try:
                headers = {"Authorization": f"Bearer {key}"} if key else None
                if self.make_request("GET", "/health", headers=headers).status_code == 200:
                    self.ready = True
                    return
            except Exception:
                pass
            time.sleep(0.02)
        raise TimeoutError(f"the router did not answer /health within {timeout_seconds}s")

    def stop(self: Any) -> None:
        if id(self) not in routed:
            return original_stop(self)
        routed.discard(id(self))
        utils.server_instances.discard(self)
        if _daemon is not None:
            _daemon.stop()

    utils.ServerProcess.start = start
    utils.ServerProcess.stop = stop
