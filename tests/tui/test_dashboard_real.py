"""The dashboard on the real engine and a real llama-server, and as a real
program in a terminal (tmux)."""

import shutil
import subprocess
import sys
import time

import httpx
import pytest
from textual.widgets import DataTable

from llama_orchestrator.engine.lifecycle import Engine
from llama_orchestrator.engine.unsupervised import Unsupervised
from llama_orchestrator.tui.app import DashboardApp
from llama_orchestrator.tui.data import EngineSource, matches, parse_metrics, per_second
from tests.helpers import run_cli, write_config
from tests.tui.conftest import until

pytestmark = pytest.mark.integration


def state_of(app, name):
    table = app.query_one("#instances", DataTable)
    return (
        str(table.get_cell(name, "STATE")) if name in [str(k.value) for k in table.rows] else None
    )


async def test_up_and_down_from_the_dashboard_on_a_real_server(home, tiny_model, server_bin):
    write_config(home, "alpha", tiny_model)
    write_config(home, "beta", tiny_model)
    source = EngineSource(home)
    app = DashboardApp(source, refresh=0.3)
    try:
        async with app.run_test(size=(130, 36)) as pilot:
            await until(lambda: state_of(app, "alpha") == "created")
            await pilot.press("u")  # alpha is selected first
            await until(lambda: state_of(app, "alpha") == "healthy", timeout=30)
            await pilot.press("d", "y")
            await until(lambda: state_of(app, "alpha") == "stopped", timeout=30)
            assert state_of(app, "beta") == "created"
    finally:
        source.close()
        Unsupervised(Engine(home)).down(["alpha", "beta"])


def plan_states(app):
    table = app.query_one("#plan-tasks", DataTable)
    return {str(k.value): str(table.get_cell(k, "STATE")) for k in table.rows}


async def test_the_plans_pane_on_a_real_daemon_opens_output_cancels_and_retries(home, tmp_path):
    """A run the real daemon executes: its task output from the run's folder;
    cancel and retry from the pane reach the daemon as `plan cancel/retry` do."""
    import json

    from llama_orchestrator.tui.screens import ConfirmScreen, TaskOutputScreen

    py = sys.executable
    plan = tmp_path / "plan.json"
    plan.write_text(
        json.dumps(
            {
                "name": "real",
                "tasks": [
                    {"id": "hello", "kind": "shell", "command": [py, "-c", "print('hi there')"]},
                    {"id": "wait", "kind": "shell", "depends_on": ["hello"],
                     "command": [py, "-c", "import time; time.sleep(120)"]},
                ],
            }
        )
    )  # fmt: skip
    r = run_cli(home, "plan", "run", str(plan))
    assert r.returncode == 0, r.stderr
    run_id = r.stdout.split()[0]
    source = EngineSource(home)
    app = DashboardApp(source, refresh=0.3)
    try:
        async with app.run_test(size=(130, 36)) as pilot:
            await pilot.press("p")
            await until(
                lambda: plan_states(app) == {"hello": "completed", "wait": "running"}, timeout=30
            )
            assert app.plan_run == run_id
            await pilot.press("tab", "enter")  # the first task: its output
            await until(lambda: isinstance(app.screen, TaskOutputScreen))
            out = app.screen.query_one("#task-output")
            await until(lambda: "hi there" in "\n".join(out.lines))
            await pilot.press("escape", "c")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("y")
            await until(lambda: plan_states(app).get("wait") == "cancelled", timeout=30)
            await pilot.press("t", "y")
            await until(lambda: plan_states(app).get("wait") == "running", timeout=30)
            assert plan_states(app)["hello"] == "completed"  # kept, not run again
            await pilot.press("c", "y")
            await until(lambda: plan_states(app).get("wait") == "cancelled", timeout=30)
    finally:
        source.close()


def test_engine_source_reads_cpu_rss_and_token_rate_from_a_real_server(home, tiny_model):
    write_config(home, "a", tiny_model)
    engine = Engine(home)
    (res,) = Unsupervised(engine).up(["a"], timeout=60)
    ticks = iter([100.0, 102.0])
    source = EngineSource(home, clock=lambda: next(ticks))
    try:
        first = source.snapshot().instances[0]
        assert (
            first.rss_mib and first.rss_mib > 1 and first.active == 0 and first.tokens_per_s is None
        )
        httpx.post(
            f"http://127.0.0.1:{res.port}/completion",
            json={"prompt": "hi", "n_predict": 10, "ignore_eos": True},
        )
        second = source.snapshot().instances[0]
        assert second.cpu_pct is not None
        assert second.tokens_per_s == pytest.approx(
            10 / 2.0
        )  # 10 tokens over the 2 s between samples
    finally:
        source.close()
        Unsupervised(engine).down(["a"])
        engine.close()


def test_engine_source_shows_the_peers_instances_as_their_routers_report_them(tmp_path, tiny_model):
    """A peer (another home, its daemon's router behind a key) on this
    machine's loopback: its instances come in with `machine`, and a peer
    that does not answer is named, not fatal."""
    import json

    from llama_orchestrator.daemon.main import stop as stop_daemon
    from llama_orchestrator.home import Home
    from tests.helpers import free_port

    a, b = Home(tmp_path / "a"), Home(tmp_path / "b")
    a.instances_dir.mkdir(parents=True)
    write_config(b, "far", tiny_model)
    port = free_port()
    b.settings_path.write_text(json.dumps({"router": {"port": port, "api_keys": ["k"]}}))
    (a.root / "b.key").write_text("k")
    a.settings_path.write_text(
        json.dumps(
            {
                "peers": [
                    {"name": "b", "url": f"http://127.0.0.1:{port}", "api_key_file": "b.key"},
                    {"name": "c", "url": f"http://127.0.0.1:{free_port()}", "timeout": 0.5},
                ]
            }
        )
    )
    source = EngineSource(a)
    try:
        assert run_cli(b, "up", "far").returncode == 0
        snap = source.snapshot()
        (row,) = snap.instances
        assert (row.machine, row.key, row.status["state"]) == ("b", "far@b", "healthy")
        assert row.cpu_pct is None  # its process is b's to measure, not ours
        assert list(snap.unreached) == ["c"] and "does not answer" in snap.unreached["c"]
        assert matches(row, "b") and not matches(row, "elsewhere")
    finally:
        source.close()
        stop_daemon(b, all_=True)


def test_parse_metrics_rates_and_filter():
    text = (
        "# HELP x\nllamacpp:tokens_predicted_total 8\nllamacpp:requests_processing 1\nbad line x\n"
    )
    assert parse_metrics(text) == {
        "llamacpp:tokens_predicted_total": 8.0,
        "llamacpp:requests_processing": 1.0,
    }
    assert per_second(None, (1.0, 5.0)) is None
    assert per_second((1.0, 5.0), (3.0, 25.0)) == 10.0
    assert per_second((1.0, 50.0), (3.0, 5.0)) is None  # counters reset by a restart
    from llama_orchestrator.tui.data import InstanceView

    v = InstanceView({"name": "qwen-7b", "alias": "qwen", "state": "healthy"})
    assert matches(v, "") and matches(v, "QWEN") and matches(v, "heal") and not matches(v, "llama")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is installed by .ci/run")
def test_the_real_command_in_tmux_shows_the_instances(home, tiny_model):
    write_config(home, "smoke-one", tiny_model)
    write_config(home, "smoke-two", tiny_model)
    session = f"llama-orch-test-{time.monotonic_ns()}"
    # started after a pause: tmux sizes a new pane after creating it
    cmd = f"sleep 1; exec {sys.executable} -m llama_orchestrator --home {home.root} dashboard"
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "30", cmd], check=True
    )
    try:
        deadline = time.monotonic() + 20
        screen = ""
        while time.monotonic() < deadline:
            screen = subprocess.run(
                ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True
            ).stdout
            if "smoke-one" in screen and "smoke-two" in screen and "Quit" in screen:
                break
            time.sleep(0.1)
        assert "smoke-one" in screen and "smoke-two" in screen, screen
        subprocess.run(["tmux", "send-keys", "-t", session, "q"], check=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # q quits: the session ends with the program
            if subprocess.run(
                ["tmux", "has-session", "-t", session], capture_output=True
            ).returncode:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the dashboard did not quit on q")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
