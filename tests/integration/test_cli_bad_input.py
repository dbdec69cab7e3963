"""Bad input: a clear one- or two-sentence error, the right exit code, no traceback,
nothing half-written."""

import json
import socket

import pytest

from tests.helpers import run_cli, write_config

pytestmark = pytest.mark.integration


def assert_user_error(r, *needles, code=2):
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    for n in needles:
        assert n in r.stderr, r.stderr


def test_invalid_json(home, tiny_model):
    write_config(home, "a", tiny_model)
    home.config_path("a").write_text('{"model": {"path": "x"},\n "server": }')
    assert_user_error(run_cli(home, "up", "a"), "config.json: invalid JSON at line 2, column 12")
    assert_user_error(run_cli(home, "config", "validate"), "invalid JSON at line 2")


def test_unknown_field(home, tiny_model):
    write_config(home, "a", tiny_model, servr={"port": 1})
    assert_user_error(
        run_cli(home, "config", "validate", "a"), "a/config.json: servr: unknown field"
    )


def test_invalid_name_creates_nothing_outside_the_home(home, tiny_model, tmp_path):
    r = run_cli(home, "init", "../evil", "--model", str(tiny_model))
    assert_user_error(r, "'../evil' is not a valid instance name")
    assert not (home.root / "evil").exists() and not (tmp_path / "evil").exists()
    assert_user_error(run_cli(home, "up", "../evil"), "not a valid instance name")


def test_port_used_by_another_instance(home, tiny_model):
    write_config(home, "a", tiny_model, server={"port": 9555})
    write_config(home, "b", tiny_model, server={"port": 9555})
    assert_user_error(run_cli(home, "up", "b"), "port 9555 is also used by instance 'a'")
    assert_user_error(
        run_cli(home, "init", "c", "--model", str(tiny_model), "--port", "9555"),
        "Port 9555 is already used by instance",
    )


def test_port_held_by_a_foreign_process(home, tiny_model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        write_config(home, "a", tiny_model, server={"port": s.getsockname()[1]})
        assert_user_error(run_cli(home, "up", "a"), "already in use by another program")


def test_missing_model_and_not_gguf(home, tmp_path):
    write_config(home, "a", tmp_path / "missing.gguf")
    assert_user_error(run_cli(home, "up", "a"), "model.path", "missing.gguf does not exist")
    junk = tmp_path / "junk.gguf"
    junk.write_text("not a model")
    write_config(home, "b", junk)
    assert_user_error(run_cli(home, "up", "b"), "is not a GGUF model")


def test_llama_server_missing(home, tiny_model, tmp_path):
    write_config(home, "a", tiny_model, binary=str(tmp_path / "no-such-llama-server"))
    assert_user_error(run_cli(home, "up", "a"), "no-such-llama-server does not exist")


def test_unknown_instance(home):
    for cmd in (
        ["down", "ghost"],
        ["logs", "ghost"],
        ["describe", "ghost"],
        ["health", "ghost"],
        ["restart", "ghost"],
        ["up", "ghost"],
    ):
        assert_user_error(run_cli(home, *cmd), "No instance named 'ghost'")


def test_state_database_that_cannot_be_written(home, tiny_model):
    write_config(home, "a", tiny_model)
    home.db_path.parent.mkdir(parents=True)
    home.db_path.mkdir()  # a directory where the database should be
    r = run_cli(home, "up", "a")
    assert_user_error(r, "state.sqlite cannot be used: it is a directory", code=1)
    assert run_cli(home, "ps").returncode == 1


def test_usage_errors_exit_2(home):
    r = run_cli(home, "up", "--no-such-option")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert_user_error(run_cli(home, "up"), "Name at least one instance")
    assert_user_error(
        run_cli(home, "init", "a", "--model", "m.gguf", "--gpu", "x,y"), "--gpu 'x,y'"
    )


def test_config_validate_prints_every_problem_and_schema_works(home, tiny_model, tmp_path):
    write_config(home, "a", tmp_path / "missing.gguf", server={"port": 9600})
    write_config(home, "b", tiny_model, gpu={"backend": "opencl"})
    write_config(home, "c", tiny_model, server={"port": 9600})
    r = run_cli(home, "config", "validate")
    assert_user_error(r, "missing.gguf does not exist", "unknown backend 'opencl'", "port 9600")
    schema = json.loads(run_cli(home, "config", "schema").stdout)
    assert "model" in schema["properties"]


def test_config_show_and_describe_hide_secrets(home, tiny_model):
    write_config(
        home,
        "a",
        tiny_model,
        server={"api_key": "sk-hidden"},
        env={"HF_TOKEN": "hf-hidden", "OMP_NUM_THREADS": "2"},
    )
    r = run_cli(home, "config", "show", "a")
    assert r.returncode == 0 and "sk-hidden" not in r.stdout and "hf-hidden" not in r.stdout
    assert "********" in r.stdout
    for args in (["describe", "a"], ["describe", "a", "--json"]):
        r = run_cli(home, *args)
        assert r.returncode == 0 and "sk-hidden" not in r.stdout and "hf-hidden" not in r.stdout
        assert "OMP_NUM_THREADS" in r.stdout  # ordinary variables stay visible


def test_a_broken_settings_file_is_reported_before_a_daemon_starts(home, tiny_model):
    from llama_orchestrator.daemon.info import lock_is_held

    write_config(home, "a", tiny_model)
    home.settings_path.write_text('{"logs": {"max_bytes": "lots"}}')
    assert_user_error(run_cli(home, "up", "a"), "llama-orch.json: logs.max_bytes")
    assert not lock_is_held(home)
