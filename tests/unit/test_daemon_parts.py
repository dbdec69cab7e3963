"""Pure parts of the daemon: errors across the control API, the Host check."""

import pytest

from llama_orchestrator.daemon.client import error_from_json, error_to_json
from llama_orchestrator.errors import (
    ConfigError,
    OrchError,
    Problem,
    StartFailed,
    UnknownInstance,
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
