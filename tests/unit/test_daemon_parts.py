"""Pure parts of the daemon: errors across the control API, the Host check."""

import pytest

from llama_orchestrator.daemon.client import error_from_json, error_to_json
from llama_orchestrator.errors import (
    ConfigError,
    OrchError,
    Problem,
    StartFailed,
    UnknownInstance,
    UnknownRun,
    UserError,
)
from llama_orchestrator.router.app import host_of


@pytest.mark.parametrize(
    "exc",
    [
        ConfigError([Problem("a/config.json", "model.path", "missing.gguf does not exist")]),
        UnknownInstance("ghost", ["a", "b"]),
        UserError("Bad thing.", hint="Fix it."),
        StartFailed("Instance 'a' exited with code 1 while starting."),
        OrchError("Something failed."),
    ],
)
def test_an_error_crosses_the_api_as_the_same_message_and_exit_code(exc):
    back = error_from_json(error_to_json(exc))
    assert str(back) == str(exc) and back.exit_code == exc.exit_code
    assert isinstance(back, UserError) == isinstance(exc, UserError)
    if isinstance(exc, ConfigError):
        assert isinstance(back, ConfigError) and back.problems == exc.problems


@pytest.mark.parametrize(
    ("header", "host"),
    [
        ("llama-orch", "llama-orch"),
        ("127.0.0.1:8080", "127.0.0.1"),
        ("localhost:1", "localhost"),
        ("[::1]:8080", "[::1]"),
        ("::1", "::1"),
        ("evil.example:80", "evil.example"),
        ("", ""),
    ],
)
def test_host_of_drops_the_port(header, host):
    assert host_of(header) == host


@pytest.mark.parametrize(
    ("exc", "code", "status"),
    [
        (UnknownInstance("ghost", []), "unknown_instance", 404),
        (UnknownRun("zzzz"), "unknown_run", 404),  # issue 40: was 400
        (ConfigError([Problem("a", "b", "c")]), "invalid_config", 400),
        (UserError("Bad."), "bad_input", 400),
        (StartFailed("Died."), "start_failed", 500),
        (OrchError("Failed."), "failed", 500),
    ],
)
def test_errors_cross_as_a_stable_code_not_a_class_name(exc, code, status):
    from llama_orchestrator.daemon.protocol import ErrorCode, code_of, http_status

    wire = error_to_json(exc)
    assert wire["code"] == code and "kind" not in wire
    assert http_status(code_of(exc)) == status
    assert ErrorCode(code).exit_code == exc.exit_code


def test_an_unknown_code_from_a_newer_daemon_still_exits_as_it_said():
    back = error_from_json({"code": "from_the_future", "message": "New.", "exit_code": 2})
    assert isinstance(back, UserError) and str(back) == "New."
    assert not isinstance(
        error_from_json({"code": "nope", "message": "x", "exit_code": 1}), UserError
    )


def test_the_engine_refuses_what_needs_the_daemon_with_the_fix(tmp_path):
    from llama_orchestrator.engine.lifecycle import Engine
    from llama_orchestrator.engine.unsupervised import Unsupervised
    from llama_orchestrator.home import Home

    engine = Unsupervised(Engine(Home(tmp_path)))
    for call in (
        lambda: engine.restart(["a"], rolling=True),
        lambda: engine.submit_plan(tmp_path / "p.json", "{}", {}),
        lambda: engine.cancel_plan("r1"),
        lambda: engine.retry_plan("r1"),
    ):
        with pytest.raises(UserError, match="daemon") as info:
            call()
        assert info.value.hint and "llama-orch daemon start" in info.value.hint


def test_router_connections_are_capped_by_the_open_files_limit_keeping_a_reserve():
    from llama_orchestrator.config.settings import RouterSettings
    from llama_orchestrator.daemon.main import FD_RESERVE, router_limits

    s = RouterSettings(max_connections=1000, header_timeout=5, send_timeout=7)
    lim = router_limits(s, 1 << 20)
    assert (lim.max_connections, lim.header_timeout, lim.send_timeout) == (1000, 5, 7)
    # 1,024 descriptors: a client and its instance connection each, the reserve kept
    assert router_limits(s, 1024).max_connections == (1024 - FD_RESERVE) // 2
    assert router_limits(s, 10).max_connections == 1


def test_the_open_files_limit_is_raised_to_the_hard_one():
    import os

    from llama_orchestrator import platform

    if os.name == "nt":
        assert platform.raise_open_files_limit() > 0
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        got = platform.raise_open_files_limit()
        assert got == resource.getrlimit(resource.RLIMIT_NOFILE)[0] > min(256, hard) or hard <= 256
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_daemon_starting_while_a_cli_looks_at_the_lock_takes_it_after_the_look(tmp_path):
    """`daemon_lock_held` holds the lock for a moment to see whether a daemon
    runs; a daemon starting in that moment must not take the asker for a
    daemon and exit "already running" (seen right after a `daemon stop`)."""
    import threading

    from llama_orchestrator import platform
    from llama_orchestrator.daemon.info import take_lock
    from llama_orchestrator.home import Home

    home = Home(tmp_path)
    home.daemon_lock.parent.mkdir(parents=True, exist_ok=True)
    looking = platform.try_lock(home.daemon_lock)  # a CLI's look, in progress
    assert looking is not None
    threading.Timer(0.1, looking.close).start()  # the look ends
    mine = take_lock(home)
    assert mine is not None  # taken once the look ended
    assert take_lock(home) is None  # a daemon that holds it is no look: it gives way
    mine.close()


def test_a_daemon_that_is_up_is_given_way_to_at_once(tmp_path, monkeypatch):
    """A second `up`'s daemon finds the first one's lock and address: it gives
    way without waiting, or it would outwait the first and start after it."""
    import os

    from llama_orchestrator import platform
    from llama_orchestrator.daemon import info
    from llama_orchestrator.engine.process import create_time_of
    from llama_orchestrator.home import Home

    home = Home(tmp_path)
    home.state_dir.mkdir(parents=True, exist_ok=True)
    held = platform.try_lock(home.daemon_lock)  # the first daemon, up
    assert held is not None
    me = os.getpid()
    info.write_info(home, info.DaemonInfo(me, create_time_of(me), 0.0, "unix", "x.sock"))

    def waited(_: float) -> None:
        raise AssertionError("the second daemon waited for the lock")

    monkeypatch.setattr(info.time, "sleep", waited)
    try:
        assert info.take_lock(home) is None
    finally:
        held.close()
