"""Defects a newcomer met in the first hour (issue 40), each as they met it."""

import json
import sys

import pytest

from llama_orchestrator.platform import port_is_free
from tests.helpers import free_port, run_cli, write_config, write_settings

pytestmark = pytest.mark.integration


@pytest.fixture()
def cli_home(home):
    yield home
    run_cli(home, "daemon", "stop", "--all")
    run_cli(home, "down", "--all", "--timeout", "5")


def test_ps_shows_the_table_and_warns_while_the_settings_have_a_typo(
    cli_home, tiny_model, fake_bin
):
    write_config(cli_home, "a", tiny_model, binary=str(fake_bin))
    r = run_cli(cli_home, "up", "a", "--no-daemon")
    assert r.returncode == 0, r.stderr
    cli_home.settings_path.write_text(json.dumps({"router": {"prot": 1}, "logs": {"backups": 2}}))
    r = run_cli(cli_home, "ps")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1].split()[:2] == ["a", "healthy*"]
    assert "warning: " in r.stderr and "router.prot: unknown field" in r.stderr
    assert "Traceback" not in r.stderr
    rows = json.loads(run_cli(cli_home, "ps", "--json").stdout)
    assert [x["name"] for x in rows] == ["a"]
    # what changes things still refuses the typo, with the same sentence
    r = run_cli(cli_home, "up", "a")
    assert r.returncode == 2 and "router.prot: unknown field" in r.stderr


def test_a_failed_up_stops_the_daemon_it_started_and_frees_the_routers_port(
    cli_home, tiny_model, fake_bin
):
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        write_config(cli_home, "a", tiny_model, binary=str(fake_bin), server={"port": port})
        settings = write_settings(cli_home)
        r = run_cli(cli_home, "up", "a")
    assert r.returncode == 2
    assert f"Port {port} on 127.0.0.1 is already in use by another program" in r.stderr
    assert "Stopped the daemon this `up` started" in r.stderr
    assert "No llama-orch daemon is running" in run_cli(cli_home, "daemon", "status").stdout
    assert port_is_free("127.0.0.1", settings["router"]["port"])


def test_a_port_held_by_another_homes_instance_names_it(home, tmp_path, tiny_model, fake_bin):
    from llama_orchestrator.home import Home

    other = Home(tmp_path / "other")
    port = free_port()
    write_config(other, "b", tiny_model, binary=str(fake_bin), server={"port": port})
    write_config(home, "a", tiny_model, binary=str(fake_bin), server={"port": port})
    try:
        assert run_cli(other, "up", "b", "--no-daemon").returncode == 0
        r = run_cli(home, "up", "a", "--no-daemon")
        assert r.returncode == 2
        assert (
            f"Port {port} on 127.0.0.1 is already in use by instance 'b' of the llama-orch "
            f"home {other.root}" in r.stderr
        )
        assert f"llama-orch --home {other.root} down b" in r.stderr
    finally:
        run_cli(other, "down", "--all")


def test_an_instance_that_dies_in_up_no_daemon_is_not_wanted_running(
    cli_home, tiny_model, fake_bin
):
    env = {"FAKE_HEALTH": "503", "FAKE_EXIT_AFTER": "0.5"}
    write_config(cli_home, "a", tiny_model, binary=str(fake_bin), env=env)
    r = run_cli(cli_home, "up", "a", "--no-daemon")
    assert r.returncode == 1 and "exited with code 3 while starting" in r.stderr
    (row,) = json.loads(run_cli(cli_home, "ps", "--json").stdout)
    # nothing restarts it here, and a daemon started later does not start it again
    assert (row["desired"], row["pid"]) == ("stopped", None)


@pytest.mark.skipif(sys.platform == "win32", reason="the control API is a unix socket here")
def test_a_flood_of_connections_to_the_control_api_leaves_it_answering(
    cli_home, tiny_model, fake_bin
):
    import socket

    import psutil

    from llama_orchestrator.daemon.info import running
    from llama_orchestrator.daemon.main import CONTROL_MAX_CONNECTIONS

    write_config(cli_home, "a", tiny_model, binary=str(fake_bin))
    write_settings(cli_home)
    assert run_cli(cli_home, "daemon", "start").returncode == 0
    daemon = psutil.Process(running(cli_home).pid)
    before = daemon.num_fds()
    flood = []
    try:
        for _ in range(CONTROL_MAX_CONNECTIONS + 200):  # each sends half a head, then waits
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(cli_home.daemon_socket))
            s.sendall(b"GET /v1/status HTTP/1.1\r\n")
            flood.append(s)
        r = run_cli(cli_home, "up", "a", timeout=60)
        assert r.returncode == 0, r.stderr
        flood[0].settimeout(10)
        assert flood[0].recv(1) == b""  # the oldest stalled one gave way
        assert daemon.num_fds() < before + CONTROL_MAX_CONNECTIONS + 20  # bounded
    finally:
        for s in flood:
            s.close()
