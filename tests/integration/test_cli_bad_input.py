"""Bad input: a clear one- or two-sentence error, the right exit code, no traceback,
nothing half-written."""

import json
import os
import socket
import subprocess
import sys
import time

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


def test_init_refuses_a_model_that_is_not_there_or_not_gguf_and_writes_nothing(
    home, tiny_model, tmp_path
):
    (tmp_path / "notes.txt").write_text("not a model")
    for model, needle in (
        (tmp_path / "typo.gguf", "typo.gguf does not exist; nothing was written"),
        (tmp_path / "notes.txt", "is not a GGUF model"),
    ):
        assert_user_error(run_cli(home, "init", "a", "--model", str(model)), needle, "--model")
        assert not home.instance_dir("a").exists()
    assert run_cli(home, "init", "a", "--model", str(tiny_model)).returncode == 0


def test_a_home_given_that_does_not_exist_is_an_error_not_an_empty_home(tmp_path, tiny_model):
    typo = tmp_path / "my-llmz"
    for args in (("ps",), ("up", "a"), ("logs", "a"), ("daemon", "status")):
        r = run_cli(typo, *args)
        assert_user_error(r, f"No llama-orch home at {typo}", "init NAME --model PATH")
    r = subprocess.run(  # $LLAMA_ORCH_HOME alike (run_cli always passes --home)
        [sys.executable, "-m", "llama_orchestrator", "ps"],
        capture_output=True,
        text=True,
        env={**os.environ, "LLAMA_ORCH_HOME": str(typo)},
        timeout=60,
    )
    assert_user_error(r, f"No llama-orch home at {typo}")
    assert not typo.exists()  # nothing was created by looking
    assert run_cli(typo, "init", "a", "--model", str(tiny_model)).returncode == 0  # init makes it
    assert (typo / "instances" / "a" / "config.json").is_file()


def test_help_works_whatever_the_home_given(tmp_path):
    """--help needs no home: a missing or wrong one is said only when used."""
    afile = tmp_path / "a-file"
    afile.write_text("")
    for home in (tmp_path / "not-yet", afile):
        for args in (("ps", "--help"), ("logs", "-h"), ("plan", "run", "--help")):
            r = run_cli(home, *args)
            assert r.returncode == 0, (home, args, r.stderr)
            assert "Usage: llama-orch" in r.stdout and "error" not in r.stderr
    assert not (tmp_path / "not-yet").exists()
    assert_user_error(run_cli(afile, "ps"), f"--home {afile} is a file")


@pytest.mark.parametrize(
    "args",
    [
        ("up", "a", "--timeout", "-1"),
        ("down", "a", "--timeout", "-2"),
        ("restart", "a", "--timeout", "-1"),
        ("logs", "a", "--tail", "-3"),
    ],
)
def test_negative_durations_and_counts_are_usage_errors(home, tiny_model, args):
    write_config(home, "a", tiny_model)
    r = run_cli(home, *args)
    assert_user_error(r, "is not in the range x>=0")
    assert "internal error" not in r.stderr


def test_init_runs_the_checks_up_would_and_force_writes_anyway(home, tiny_model, tmp_path):
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(tiny_model.read_bytes()[:100_000])  # header whole, data cut
    for args, needle in (
        (("--model", str(truncated)), "cut.gguf is truncated: it has 100,000 bytes"),
        (("--model", str(tiny_model), "--", "--port", "9999"), "--port is managed by llama-orch"),
    ):
        r = run_cli(home, "init", "a", *args)
        assert_user_error(r, needle, "Nothing was written", "--force")
        assert not home.instance_dir("a").exists()
    # config validate sees the truncation too, and up refuses it before starting anything
    r = run_cli(home, "init", "a", "--model", str(truncated), "--force")
    assert r.returncode == 0, r.stderr
    assert_user_error(run_cli(home, "config", "validate"), "cut.gguf is truncated")
    assert_user_error(run_cli(home, "up", "a", "--no-daemon"), "cut.gguf is truncated")


def test_config_validate_checks_the_settings_file_too(home, tiny_model):
    write_config(home, "a", tiny_model)
    home.settings_path.write_text('{"router": {"prot": 8090}}')
    assert_user_error(
        run_cli(home, "config", "validate"), "llama-orch.json: router.prot: unknown field"
    )
    home.settings_path.write_text('{"router": {"port": 8090}}')
    r = run_cli(home, "config", "validate")
    assert r.returncode == 0 and "1 instance config and llama-orch.json OK" in r.stdout


def test_a_home_that_is_a_file_is_named_and_a_new_home_is_announced(tmp_path, tiny_model):
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    for args in (("ps",), ("init", "a", "--model", str(tiny_model)), ("demo",)):
        assert_user_error(run_cli(afile, *args), f"--home {afile} is a file, not a folder")
    r = run_cli(tmp_path / "fresh", "init", "a", "--model", str(tiny_model))
    assert r.returncode == 0 and f"created a new home at {tmp_path / 'fresh'}" in r.stdout
    port = json.loads((tmp_path / "fresh" / "instances" / "a" / "config.json").read_text())
    assert f"port {port['server']['port']} (the first free one from 8001" in r.stdout
    r = run_cli(tmp_path / "fresh", "init", "b", "--model", str(tiny_model))
    assert r.returncode == 0 and "created a new home" not in r.stdout


def test_ps_names_the_per_user_home_it_falls_back_to(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "llama_orchestrator", "ps"],
        capture_output=True,
        text=True,
        cwd=empty,
        env={k: v for k, v in os.environ.items() if k != "LLAMA_ORCH_HOME"},
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    per_user = tmp_path / "xdg-data" / "llama-orch"  # XDG_DATA_HOME of the test
    assert f"(home: {per_user}, the per-user one" in r.stderr


def test_a_damaged_or_emptied_state_database_is_named_and_kept_aside_on_reset(home, tiny_model):
    """Issue 24.5: a corrupted page is not 'the disk is full', and a 0-byte
    database does not silently start a fresh history."""
    from llama_orchestrator.store.database import Store

    write_config(home, "a", tiny_model)
    store = Store.open(home.db_path)
    for i in range(400):  # a few pages of history
        store.add_event("a", "note", f"event {i} " + "x" * 200)
    store.close()
    data = home.db_path.read_bytes()
    page = 4096
    home.db_path.write_bytes(data[:page] + bytes(range(256)) * ((len(data) - page) // 256 + 1))
    for args in (("ps",), ("events", "a")):
        r = run_cli(home, *args)
        assert r.returncode == 1 and "is damaged (database disk image is malformed)" in r.stderr
        assert "disk is full" not in r.stderr and "--reset-state" in r.stderr
    r = run_cli(home, "daemon", "start", "--reset-state")
    assert r.returncode == 0, r.stderr
    kept = list(home.state_dir.glob("state.sqlite.corrupt-*"))
    assert len(kept) == 1 and kept[0].read_bytes()[:page] == data[:page]
    assert "Kept the old state database as" in r.stdout
    assert run_cli(home, "ps").returncode == 0
    # while a daemon runs, it holds the database: no reset under it
    r = run_cli(home, "daemon", "start", "--reset-state")
    assert r.returncode == 1 and "holds its state database" in r.stderr
    assert run_cli(home, "daemon", "stop").returncode == 0

    home.db_path.write_bytes(b"")
    for suffix in ("-wal", "-shm"):
        home.db_path.with_name(home.db_path.name + suffix).unlink(missing_ok=True)
    os.utime(home.db_path, (time.time() - 60, time.time() - 60))
    r = run_cli(home, "ps")
    assert r.returncode == 1 and "is empty (0 bytes): its history is gone" in r.stderr
    assert home.db_path.stat().st_size == 0  # nothing was written over it


def test_a_model_folder_is_named_as_a_folder_and_logs_say_nothing_ran(home, tiny_model, tmp_path):
    """Issue 40: `init --model models/` said the file "does not exist"; `logs`
    of an instance never started printed nothing."""
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "tiny.gguf").write_bytes(tiny_model.read_bytes())
    r = run_cli(home, "init", "x", "--model", str(folder))
    assert_user_error(r, "is a folder, not a model file", "tiny.gguf")
    assert not home.config_path("x").exists()
    write_config(home, "a", folder)
    assert_user_error(run_cli(home, "config", "validate", "a"), "is a folder; name a .gguf file")
    write_config(home, "b", tiny_model)
    r = run_cli(home, "logs", "b")
    assert r.returncode == 0 and r.stdout == ""
    assert "'b' has no output yet: it has not been started (`llama-orch up b`)" in r.stderr
