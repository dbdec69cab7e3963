"""The supervisor daemon on real processes: the real llama-server where it can
show the behaviour, the fake server for faults it will not do on demand."""

from __future__ import annotations

import json
import os
import signal
import stat
import threading
import time

import httpx
import psutil
import pytest

from llama_orchestrator.daemon.info import lock_is_held, running
from llama_orchestrator.daemon.main import stop as stop_daemon
from llama_orchestrator.engine.health import http_get
from llama_orchestrator.home import Home
from llama_orchestrator.states import InstanceState as S
from llama_orchestrator.store.database import Store
from llama_orchestrator.store.rows import InstanceRow
from tests.helpers import free_port, run_cli, wait_until, write_config, write_unloadable_model

pytestmark = pytest.mark.integration

FAST = {"interval": 0.2, "timeout": 0.5, "retries": 2, "start_period": 0}


def row(home: Home, name: str) -> InstanceRow:
    store = Store.open(home.db_path)
    try:
        r = store.get(name)
        assert r is not None
        return r
    finally:
        store.close()


def events(home: Home, name: str | None = None) -> list:
    store = Store.open(home.db_path)
    try:
        return store.events(name)
    finally:
        store.close()


def kinds(home: Home, name: str) -> list[str]:
    return [e.kind for e in events(home, name)]


def up(home: Home, *args: str) -> None:
    r = run_cli(home, "up", *args)
    assert r.returncode == 0, r.stderr


def daemon_pid(home: Home) -> int:
    info = running(home)
    assert info is not None
    return info.pid


def processes_on_port(port: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and f"--port {port}" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


# --- real llama-server ----------------------------------------------------------


def test_kill_9_is_seen_at_once_and_restarted_with_a_new_pid(home, tiny_model, server_bin):
    write_config(home, "a", tiny_model, restart_policy={"backoff_initial": 0.1})
    up(home, "a")
    first = row(home, "a")
    assert first.supervised and first.state == S.HEALTHY
    os.kill(first.pid, signal.SIGKILL)
    again = wait_until(
        lambda: (r := row(home, "a")).state == S.HEALTHY and r.pid != first.pid and r,
        timeout=30,
    )
    assert again.restarts == 1 and again.last_exit["signal"] == signal.SIGKILL
    assert kinds(home, "a")[-4:] == ["exited", "backoff", "starting", "healthy"]
    exited = [e for e in events(home, "a") if e.kind == "exited"][-1]
    assert "killed by signal 9 (SIGKILL)" in exited.message
    assert exited.data["stderr_tail"]  # the cause is one command away
    ps = json.loads(run_cli(home, "ps", "--json").stdout)[0]
    assert ps["restarts"] == 1 and ps["last_exit"]["signal"] == 9 and ps["supervised"]


@pytest.mark.posix  # its crashing server is a shell script
def test_a_crash_loop_ends_failed_after_max_retries(home, tiny_model, server_bin, tmp_path):
    # a server that dies at every start for a reason a restart might cure (an
    # unknown flag no longer serves: llama-server's refusal is fatal at once)
    crashing = tmp_path / "crashing-server"
    crashing.write_text("#!/bin/sh\necho 'something went wrong' >&2\nexit 1\n")
    crashing.chmod(0o755)
    write_config(
        home,
        "loop",
        tiny_model,
        binary=str(crashing),
        restart_policy={"max_retries": 2, "backoff_initial": 0.05},
    )
    r = run_cli(home, "up", "loop")
    assert r.returncode == 1 and "exited with code 1 while starting" in r.stderr
    assert "something went wrong" in r.stderr
    failed = wait_until(lambda: (x := row(home, "loop")).state == S.FAILED and x, timeout=30)
    assert failed.restarts == 2 and failed.last_exit["code"] == 1
    assert kinds(home, "loop").count("starting") == 3  # the first run and two restarts
    assert not processes_on_port(failed.port)
    text = run_cli(home, "ps").stdout
    assert "failed" in text and " 2 " in text


def test_a_killed_daemon_loses_nothing_and_the_next_one_adopts(home, tiny_model, server_bin):
    write_config(home, "a", tiny_model, restart_policy={"backoff_initial": 0.1})
    up(home, "a")
    before = row(home, "a")
    os.kill(daemon_pid(home), signal.SIGKILL)
    wait_until(lambda: not lock_is_held(home))
    assert http_get("127.0.0.1", before.port, "/health", 2)[0] == 200  # still serving
    assert "healthy*" in run_cli(home, "ps").stdout  # nobody supervises it now

    r = run_cli(home, "daemon", "start")
    assert r.returncode == 0 and "Started the llama-orch daemon" in r.stdout
    adopted = wait_until(lambda: (x := row(home, "a")).supervised and x)
    assert adopted.pid == before.pid and adopted.create_time == before.create_time
    assert [p.pid for p in processes_on_port(before.port)] == [before.pid]  # no duplicate
    assert kinds(home, "a")[-1] == "adopted"

    os.kill(before.pid, signal.SIGKILL)  # supervision resumed: it is restarted
    again = wait_until(
        lambda: (x := row(home, "a")).state == S.HEALTHY and x.pid != before.pid and x,
        timeout=30,
    )
    assert again.restarts == 1
    exited = [e for e in events(home, "a") if e.kind == "exited"][-1]
    assert "exit code unknown" in exited.message  # adopted: not the new daemon's child


def test_daemon_start_stop_status_and_one_per_home(home, tiny_model, server_bin):
    write_config(home, "a", tiny_model)
    assert json.loads(run_cli(home, "daemon", "status", "--json").stdout)["running"] is False
    r = run_cli(home, "daemon", "start")
    assert r.returncode == 0 and "Started" in r.stdout
    again = run_cli(home, "daemon", "start")
    assert (
        again.returncode == 0
        and f"already running for {home.root} (pid {daemon_pid(home)})" in again.stdout
    )
    fg = run_cli(home, "daemon", "start", "--foreground")  # the lock refuses a second one
    assert fg.returncode == 0 and "already running" in fg.stdout

    status = json.loads(run_cli(home, "daemon", "status", "--json").stdout)
    assert {"running", "pid", "uptime_s", "home", "socket", "router_url", "instances"} <= set(
        status
    )
    assert status["home"] == str(home.root) and status["socket"] == str(home.daemon_socket)
    assert stat.S_IMODE(home.daemon_socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.daemon_info.stat().st_mode) == 0o600

    up(home, "a")
    pid = row(home, "a").pid
    r = run_cli(home, "daemon", "stop")
    assert r.returncode == 0 and "instances keep running" in r.stdout
    assert psutil.pid_exists(pid) and not row(home, "a").supervised
    assert "healthy*" in run_cli(home, "ps").stdout

    up(home, "a")  # starts a daemon again, which takes the running instance over
    assert row(home, "a").pid == pid and row(home, "a").supervised
    r = run_cli(home, "daemon", "stop", "--all")
    assert r.returncode == 0 and "and its instances" in r.stdout
    wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie")
    assert row(home, "a").state == S.STOPPED

    lines = [json.loads(x) for x in home.daemon_log.read_text().splitlines()]
    assert {"ts", "level", "msg"} <= set(lines[0])
    assert any(x.get("kind") == "healthy" and x.get("instance") == "a" for x in lines)


def test_sigterm_stops_the_daemon_gracefully_and_leaves_instances(home, tiny_model, server_bin):
    write_config(home, "a", tiny_model)
    up(home, "a")
    pid, dpid = row(home, "a").pid, daemon_pid(home)
    os.kill(dpid, signal.SIGTERM)
    wait_until(lambda: not lock_is_held(home))
    assert not home.daemon_socket.exists() and not home.daemon_info.exists()
    assert (
        psutil.pid_exists(pid)
        and http_get("127.0.0.1", row(home, "a").port, "/health", 2)[0] == 200
    )
    assert any("received SIGTERM" in x for x in home.daemon_log.read_text().splitlines())
    assert run_cli(home, "down", "a").returncode == 0  # without a daemon: directly


# --- faults of the fake server ----------------------------------------------------


def test_a_hanging_health_check_counts_as_failure_and_restarts(home, tiny_model, fake_bin):
    write_config(
        home,
        "hang",
        tiny_model,
        binary=str(fake_bin),
        env={"FAKE_HEALTH_HANG": "1"},
        healthcheck=FAST,
        restart_policy={"backoff_initial": 0.05, "max_retries": 1},
    )
    run_cli(home, "up", "hang", "--no-wait")
    failed = wait_until(lambda: (x := row(home, "hang")).state == S.FAILED and x, timeout=30)
    assert failed.restarts == 1
    unhealthy = [e for e in events(home, "hang") if e.kind == "unhealthy"]
    assert len(unhealthy) == 2 and "no answer within 0.5s" in unhealthy[0].message


def test_503_stays_starting_for_start_period_then_unhealthy_and_restarted(
    home, tiny_model, fake_bin
):
    write_config(
        home,
        "loading",
        tiny_model,
        binary=str(fake_bin),
        env={"FAKE_HEALTH": "503", "FAKE_QUIET": "1"},  # a load that shows no progress
        healthcheck={**FAST, "start_period": 1.5, "load_timeout": 0.5},
        restart_policy={"backoff_initial": 0.05, "max_retries": 1},
    )
    run_cli(home, "up", "loading", "--no-wait")
    wait_until(lambda: row(home, "loading").state == S.FAILED, timeout=30)
    evs = events(home, "loading")
    assert [e.kind for e in evs][:3] == ["starting", "unhealthy", "exited"]
    started, unhealthy = evs[0], evs[1]
    assert unhealthy.ts - started.ts >= 1.5  # never a failure while the model "loads"
    assert "loading" in unhealthy.message  # the 503 body


def test_a_server_ignoring_sigterm_is_killed_after_stop_timeout(home, tiny_model, fake_bin):
    write_config(
        home,
        "stubborn",
        tiny_model,
        binary=str(fake_bin),
        env={"FAKE_IGNORE_SIGTERM": "1"},
        stop_timeout=0.5,
    )
    up(home, "stubborn")
    pid = row(home, "stubborn").pid
    r = run_cli(home, "down", "stubborn")
    assert r.returncode == 0 and "stubborn stopped" in r.stdout
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    stopped = [e for e in events(home, "stubborn") if e.kind == "stopped"][-1]
    assert stopped.data["graceful"] is False and "killed after 0.5s" in stopped.message
    assert row(home, "stubborn").state == S.STOPPED  # and not restarted: the user stopped it


def test_a_server_that_keeps_dying_is_restarted_with_growing_backoff(home, tiny_model, fake_bin):
    write_config(
        home,
        "flaky",
        tiny_model,
        binary=str(fake_bin),
        env={"FAKE_EXIT_AFTER": "0.3"},
        restart_policy={"backoff_initial": 0.2, "backoff_max": 10, "max_retries": 3},
    )
    up(home, "flaky")
    failed = wait_until(lambda: (x := row(home, "flaky")).state == S.FAILED and x, timeout=30)
    assert failed.restarts == 3 and failed.last_exit["code"] == 3
    # as decided (restart_at less the event's time would count how late it was written)
    delays = [e.data["delay_s"] for e in events(home, "flaky") if e.kind == "backoff"]
    assert len(delays) == 3
    for n, delay in enumerate(delays):
        assert 0.2 * 2**n * 0.9 - 0.001 <= delay <= 0.2 * 2**n * 1.1 + 0.001


def test_completion_probe_catches_a_server_whose_generations_fail(home, tiny_model, fake_bin):
    write_config(
        home,
        "broken",
        tiny_model,
        binary=str(fake_bin),
        env={"FAKE_COMPLETION": "500"},
        healthcheck={
            **FAST,
            "probe": "completion",
            "deep_interval": 0.1,
            "retries": 1,
            "start_period": 10,  # not listening yet at the first probe is no failure
        },
        restart_policy={"backoff_initial": 0.05, "max_retries": 1},
    )
    run_cli(home, "up", "broken", "--no-wait")
    wait_until(lambda: row(home, "broken").state == S.FAILED, timeout=30)
    evs = events(home, "broken")
    # /health answers 200, so it is healthy at first; the deep check then fails it
    assert [e.kind for e in evs][:3] == ["starting", "healthy", "unhealthy"]
    assert "broken" in evs[2].message  # the failed completion's answer


def test_completion_probe_passes_on_the_real_server(home, tiny_model, server_bin):
    write_config(
        home, "deep", tiny_model, healthcheck={**FAST, "probe": "completion", "deep_interval": 0.1}
    )
    up(home, "deep")
    before = kinds(home, "deep")
    wait_until(lambda: _checks(home, "deep") >= 5, timeout=20)  # deep checks among them
    assert row(home, "deep").state == S.HEALTHY and kinds(home, "deep") == before


def _checks(home: Home, name: str) -> float:
    """Healthy checks counted by the daemon's /metrics."""
    text = _raw(running(home), "GET", "/metrics")[1]
    prefix = f'llama_orch_health_checks_total{{instance="{name}",result="healthy"}} '
    return sum(float(x[len(prefix) :]) for x in text.splitlines() if x.startswith(prefix))


# --- the control API ------------------------------------------------------------------


def _raw(info, method: str, path: str, body: bytes | None = None, host: str = "llama-orch"):
    from llama_orchestrator.daemon.client import _Connection

    conn = _Connection(info, 10)
    try:
        conn.request(
            method,
            path,
            body=body,
            headers={"Host": host, "Content-Type": "application/json"},
            encode_chunked=body is not None and not isinstance(body, bytes),  # no length
        )
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def test_bad_requests_get_4xx_json_errors_and_the_daemon_keeps_running(home, tiny_model):
    write_config(home, "a", tiny_model)
    assert run_cli(home, "daemon", "start").returncode == 0
    info = running(home)
    cases = [
        ("POST", "/v1/up", b'{"names": ["a"', 400),  # malformed JSON
        ("POST", "/v1/up", b'{"names": ["ghost"]}', 404),  # unknown instance
        ("POST", "/v1/up", b'{"names": ["../x"]}', 400),  # not a valid name
        ("POST", "/v1/up", b'{"names": "a"}', 400),  # wrong type
        ("POST", "/v1/up", b'{"names": ["a"], "bogus": 1}', 400),  # unknown field
        ("POST", "/v1/down", b"x" * (2 << 20), 413),  # oversized body
        ("POST", "/v1/down", iter([b"x" * 65536] * 32), 413),  # oversized, chunked: no length
        ("POST", "/v1/up", b"\xff\xfe{", 400),  # not even text
        ("GET", "/v1/up", None, 404),  # a route that takes POST
        ("GET", "/v1/nothing", None, 404),
    ]
    for method, path, body, expected in cases:
        status, text = _raw(info, method, path, body)
        assert status == expected, (path, body[:40] if isinstance(body, bytes) else body, text)
        error = json.loads(text)["error"]
        assert error["message"] and error["exit_code"] == 2
    assert (
        "ghost"
        in json.loads(_raw(info, "POST", "/v1/up", b'{"names": ["ghost"]}')[1])["error"]["message"]
    )
    status, text = _raw(info, "GET", "/v1/status", host="evil.example:80")  # DNS rebinding
    assert status == 421
    status, text = _raw(info, "GET", "/v1/status")
    assert status == 200 and json.loads(text)["pid"] == info.pid  # still alive and well


def test_cli_errors_through_the_daemon_read_as_without_it(home, tiny_model):
    (home.instances_dir / "a").mkdir()
    home.config_path("a").write_text('{"model": {"path": "x.gguf"}, "server": {"port": 9}}')
    assert run_cli(home, "daemon", "start").returncode == 0
    r = run_cli(home, "up", "a")
    assert r.returncode == 2 and "model.path" in r.stderr and "Traceback" not in r.stderr
    assert running(home) is not None


def test_metrics(home, tiny_model, server_bin):
    write_config(home, "a", tiny_model, healthcheck=FAST)
    up(home, "a")
    wait_until(lambda: 'result="healthy"' in _raw(running(home), "GET", "/metrics")[1])
    text = _raw(running(home), "GET", "/metrics")[1]
    assert 'llama_orch_instance_up{instance="a"} 1.0' in text
    assert 'llama_orch_instance_state{instance="a",state="healthy"} 1.0' in text
    assert 'llama_orch_restarts_total{instance="a"} 0.0' in text
    assert 'llama_orch_health_check_latency_seconds_count{instance="a"}' in text


# --- concurrency ---------------------------------------------------------------------


def test_cli_commands_racing_the_daemon_never_double_spawn(home, tiny_model, fake_bin):
    names = ["c1", "c2"]
    for n in names:
        write_config(
            home,
            n,
            tiny_model,
            binary=str(fake_bin),
            env={"FAKE_EXIT_AFTER": "3"},
            healthcheck=FAST,
            restart_policy={"mode": "always", "backoff_initial": 0.05, "max_retries": 50},
        )
    up(home, *names)
    errors: list[str] = []

    def hammer(ops: list[tuple[str, ...]]) -> None:
        for op in ops:
            r = run_cli(home, *op)
            if (
                r.returncode not in (0, 1)
                or "Traceback" in r.stderr
                or "internal error" in r.stderr
            ):
                errors.append(f"{op}: {r.returncode} {r.stderr}")

    plans = [
        [("up", "c1", "--no-wait"), ("restart", "c2"), ("up", "c2", "--no-wait"), ("ps",)],
        [
            ("up", "c1", "c2", "--no-wait"),
            ("down", "c1"),
            ("up", "c1", "--no-wait"),
            ("ps", "--json"),
        ],
        [
            ("restart", "c1"),
            ("up", "c2", "--no-wait"),
            ("describe", "c1"),
            ("up", "c1", "--no-wait"),
        ],
    ]
    threads = [threading.Thread(target=hammer, args=(p,)) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for n in names:
        assert len(processes_on_port(row(home, n).port)) <= 1
        # the record of every run: no start while a process of the instance still ran
        running_now = False
        for e in events(home, n):
            if e.kind == "starting":
                assert not running_now, f"{n}: started twice without an end between"
                running_now = True
            elif e.kind in ("exited", "stopped"):
                running_now = False
    store = Store.open(home.db_path)
    try:
        assert store._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        store.close()


def test_a_new_daemon_starts_what_should_run_but_died_meanwhile(home, tiny_model, server_bin):
    write_config(home, "a", tiny_model)
    write_config(home, "b", tiny_model)
    write_config(home, "c", tiny_model, autostart=True)  # never started by anyone
    up(home, "a", "b")
    assert run_cli(home, "down", "b").returncode == 0  # the user wants b stopped
    first = row(home, "a")
    os.kill(daemon_pid(home), signal.SIGKILL)
    wait_until(lambda: not lock_is_held(home))
    os.kill(first.pid, signal.SIGKILL)  # as after a reboot: nothing runs any more

    assert run_cli(home, "daemon", "start").returncode == 0
    a = wait_until(lambda: (x := row(home, "a")).state == S.HEALTHY and x, timeout=30)
    c = wait_until(lambda: (x := row(home, "c")).state == S.HEALTHY and x, timeout=30)
    assert a.pid != first.pid and a.supervised and c.supervised
    assert row(home, "b").state == S.STOPPED  # still what the user asked for


def test_ps_answers_from_the_state_database_when_the_daemon_is_stalled(home, tiny_model):
    """ps asks the daemon for its view, but a daemon that does not answer
    (its loop stalled: here SIGSTOP) costs ps a few seconds, never a hang."""
    write_config(home, "a", tiny_model)
    up(home, "a")
    pid = daemon_pid(home)
    os.kill(pid, signal.SIGSTOP)
    try:
        r = run_cli(home, "ps", "--json", timeout=60)
        assert r.returncode == 0, r.stderr
        (view,) = json.loads(r.stdout)
        assert view["name"] == "a" and view["state"] == "healthy" and view["supervised"]
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_router_port_already_taken_is_said_at_up_in_ps_and_daemon_status(home, tiny_model):
    import socket

    taken = socket.create_server(("127.0.0.1", 0))  # as another home's router would hold it
    port = taken.getsockname()[1]
    try:
        home.settings_path.write_text(json.dumps({"router": {"port": port}}))
        write_config(home, "a", tiny_model)
        r = run_cli(home, "up", "a")
        assert r.returncode == 0, r.stderr
        said = f"warning: no router: The router cannot listen on 127.0.0.1:{port}"
        assert said in r.stderr and "set router.port in llama-orch.json" in r.stderr
        assert '{"router": {"port": ' in r.stderr  # a free port to use instead
        assert said in run_cli(home, "ps").stderr
        text = run_cli(home, "daemon", "status").stdout
        assert f"router       not listening: The router cannot listen on 127.0.0.1:{port}" in text
        data = json.loads(run_cli(home, "daemon", "status", "--json").stdout)
        assert data["router_url"] is None and "cannot listen" in data["router_error"]
    finally:
        taken.close()
        run_cli(home, "down", "--all", "--timeout", "5")


def test_a_model_llama_server_cannot_load_fails_at_once_and_describe_says_why(home, tmp_path):
    model = write_unloadable_model(tmp_path / "odd.gguf")
    write_config(home, "a", model, restart_policy={"mode": "always", "max_retries": 5})
    try:
        run_cli(home, "up", "a", "--timeout", "30")
        wait_until(lambda: row(home, "a").state == S.FAILED, timeout=30)
        assert row(home, "a").restarts == 0  # not five attempts first
        events = run_cli(home, "events", "a", "--json").stdout.splitlines()
        failed = [json.loads(x) for x in events if json.loads(x)["kind"] == "failed"]
        assert "llama-server could not load its model" in failed[-1]["message"]
        assert "not restarted" in failed[-1]["message"]
        ps = json.loads(run_cli(home, "ps", "--json").stdout)[0]
        assert ps["last_exit"]["at"].endswith("+00:00")  # ISO 8601, like every other time
        r = run_cli(home, "describe", "a")
        assert r.returncode == 0 and "Traceback" not in r.stderr
        assert "last exit    exited with code" in r.stdout and ps["last_exit"]["at"] in r.stdout
        assert "  pid          -" in r.stdout  # not Python's None
    finally:
        run_cli(home, "down", "--all", "--timeout", "5")


def test_servers_started_but_never_recorded_are_adopted_or_stopped_by_the_next_daemon(
    home, tiny_model
):
    """Issue 24.4: a daemon killed between a spawn and its commit leaves a
    llama-server no row names. The next daemon finds it by its marker: one that
    runs what its config says is adopted; one whose config changed is stopped."""
    from llama_orchestrator import platform
    from llama_orchestrator.engine.lifecycle import Engine
    from llama_orchestrator.engine.process import track_child

    for name in ("a", "b", "c"):
        write_config(home, name, tiny_model, model={"threads": 1})
    engine = Engine(home)
    try:
        launches = {p.name: p for p in engine.prepare(["a", "b", "c"])}
    finally:
        engine.close()
    procs = {}
    for name, p in launches.items():  # what the dead daemon's spawns left: no rows
        log_dir = home.log_dir(name)
        log_dir.mkdir(parents=True)
        with open(log_dir / "stderr.log", "ab") as err:
            procs[name] = platform.spawn(
                p.launch.argv, p.launch.env, p.config_path.parent, err, err
            )
        track_child(procs[name])
    write_config(home, "b", tiny_model, model={"threads": 1, "alias": "renamed"})
    (home.instances_dir / "c" / "config.json").unlink()  # and c is no longer configured
    (home.instances_dir / "c").rmdir()
    try:
        _adopt_or_stop(home, procs)
    finally:  # whatever happened, none of them outlives the test
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()


def _adopt_or_stop(home: Home, procs: dict) -> None:
    assert run_cli(home, "daemon", "start").returncode == 0
    wait_until(lambda: row(home, "a").state == S.HEALTHY, timeout=30)
    assert row(home, "a").pid == procs["a"].pid and row(home, "a").supervised
    assert "adopted" in kinds(home, "a")
    for name in ("b", "c"):
        procs[name].wait(30)  # stopped by the daemon
        (stopped,) = [e for e in events(home, name) if e.kind == "orphan_stopped"]
        assert str(procs[name].pid) in stopped.message
    assert (
        "config changed" in next(e for e in events(home, "b") if e.kind == "orphan_stopped").message
    )
    assert "no instance of that name" in events(home, "c")[-1].message
    assert procs["a"].poll() is None  # the adopted one runs on, supervised


@pytest.fixture()
def tmpfs_home(tmp_path):
    """A home on a 6 MB tmpfs (a disk that can really fill), unmounted afterwards."""
    import subprocess

    root = tmp_path / "small"
    root.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(root)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"no tmpfs can be mounted here: {mounted.stderr.decode().strip()}")
    (root / "instances").mkdir()
    home = Home(root)
    try:
        yield home
    finally:
        stop_daemon(home, all_=True)
        # a process that just exited may hold it a moment longer ("target is busy")
        try:
            wait_until(lambda: _umount(root), timeout=10, interval=0.1)
        except AssertionError:
            subprocess.run(["umount", "-l", str(root)], check=True)
            raise


def _umount(root) -> bool:
    import subprocess

    return subprocess.run(["umount", str(root)], capture_output=True).returncode == 0


def fill_disk(folder) -> list:
    """Take every byte left on the disk of `folder` (big blocks, then small)."""
    taken = []
    for size in (1 << 16, 512):
        path = folder / f"ballast-{size}-{len(list(folder.glob('ballast-*')))}"
        taken.append(path)
        with open(path, "wb", buffering=0) as f:
            try:
                while f.write(b"\0" * size):
                    pass
            except OSError as exc:
                assert exc.errno == 28, exc
    return taken


def test_a_full_disk_drops_nothing_and_says_so(tmpfs_home, tiny_model, server_bin):
    """Issue 24.3: an instance killed while the disk is full is seen, restarted
    and recorded; ps tells the truth throughout and says the disk is full; a
    start that needs room is refused in one sentence; once there is room the
    state is written and nothing was lost."""
    home = tmpfs_home
    write_config(home, "a", tiny_model, restart_policy={"backoff_initial": 0.1})
    write_config(home, "b", tiny_model)
    up(home, "a", "--wait")
    first = row(home, "a").pid
    ballast = fill_disk(home.root)
    os.kill(first, signal.SIGKILL)

    def ps() -> tuple[dict, str]:
        r = run_cli(home, "ps", "--json")
        assert r.returncode == 0, r.stderr
        (a,) = [x for x in json.loads(r.stdout) if x["name"] == "a"]
        assert not (a["pid"] == first and a["state"] == "healthy"), a  # never a dead pid's health
        return a, r.stderr

    # restarted and healthy again (so b below is not queued behind a's load)
    a, warned = wait_until(
        lambda: (x := ps())[0]["pid"] not in (None, first) and x[0]["state"] == "healthy" and x,
        timeout=30,
    )
    assert f"The state database {home.db_path} cannot be written" in warned
    assert "is full (" in warned and "The daemon supervises from memory" in warned
    ballast += fill_disk(home.root)  # what a restart's churn gave back meanwhile
    r = run_cli(home, "up", "b")  # its log cannot even take its first line
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert (
        f"The logs of instance 'b' cannot be written: the disk of {home.log_dir('b')}" in r.stderr
    )
    for path in ballast:
        path.unlink()
    wait_until(lambda: row(home, "a").pid == a["pid"], timeout=30)  # written once there is room
    wait_until(lambda: not ps()[1], timeout=10)  # and the warning is gone
    assert kinds(home, "a")[-4:] == ["exited", "backoff", "starting", "healthy"]
    assert row(home, "a").state == S.HEALTHY and row(home, "a").restarts == 1
    up(home, "b")  # and starts work again


def test_a_connection_flood_cannot_take_the_daemons_last_descriptors(home, tiny_model, server_bin):
    """Issues 24.2 and 40: ~1,100 idle connections to a daemon whose
    open-files limit is 1,024, a quarter to the router and the rest to the
    control API. Both are capped within the limit (the stalled connections
    give way), so its probes keep their descriptors, nothing is restarted,
    and the CLI and the router answer during the flood. (Probes that find no
    descriptor, which is no verdict on a server, are test_runner's.)"""
    import resource
    import socket
    import subprocess
    import sys

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"this test opens ~1,100 sockets; the hard open-files limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    router_port = free_port()
    home.settings_path.write_text(json.dumps({"router": {"port": router_port}}))
    write_config(home, "a", tiny_model, healthcheck=FAST | {"retries": 1})

    def small_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    subprocess.run(
        [sys.executable, "-m", "llama_orchestrator", "--home", str(home.root), "daemon", "start"],
        check=True,
        capture_output=True,
        preexec_fn=small_limit,
    )
    up(home, "a", "--wait")
    conns = []
    try:
        for i in range(1100):  # a quarter to the router, the rest to the control socket
            s = socket.socket(socket.AF_UNIX) if i % 4 else socket.socket()
            s.settimeout(5)
            s.connect(str(home.daemon_socket) if i % 4 else ("127.0.0.1", router_port))
            conns.append(s)
        time.sleep(1.0)  # five check intervals
        r = run_cli(home, "ps", "--json")  # through the control API
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)[0]["supervised"] is True
        r = httpx.post(
            f"http://127.0.0.1:{router_port}/v1/completions",
            json={"model": "a", "prompt": "hi", "max_tokens": 2},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        assert row(home, "a").state == S.HEALTHY and row(home, "a").restarts == 0
    finally:
        for s in conns:
            s.close()
    text = home.daemon_log.read_text()
    assert "no verdict on the server" not in text  # its probes never ran out
    assert "task failed" not in text and "Traceback" not in text, text[-3000:]


def test_an_argument_llama_server_refuses_fails_at_once(home, tiny_model):
    """Issue 40: an unknown flag burnt five restarts (~31 s) before `failed`."""
    write_config(
        home,
        "a",
        tiny_model,
        server={"extra_args": ["--no-such-flag"]},
        restart_policy={"mode": "always", "max_retries": 5},
    )
    try:
        run_cli(home, "up", "a", "--timeout", "30")
        wait_until(lambda: row(home, "a").state == S.FAILED, timeout=30)
        assert row(home, "a").restarts == 0
        events = run_cli(home, "events", "a", "--json").stdout.splitlines()
        failed = [json.loads(x) for x in events if json.loads(x)["kind"] == "failed"]
        assert (
            "llama-server refused its arguments (invalid argument: --no-such-flag)"
            in (failed[-1]["message"])
        )
    finally:
        run_cli(home, "down", "--all", "--timeout", "5")
