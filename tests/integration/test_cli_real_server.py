"""The `llama-orch` command as a user runs it: separate processes, exit codes, messages."""

import json
import re
import subprocess
import sys
from contextlib import contextmanager

import httpx
import psutil
import pytest

from llama_orchestrator.store.database import Store
from tests.conftest import in_this_session
from tests.helpers import run_cli, wait_until, write_config

pytestmark = pytest.mark.integration

PS_KEYS = {
    "name",
    "state",
    "desired",
    "pid",
    "host",
    "port",
    "alias",
    "model_path",
    "backend",
    "gpu_devices",
    "restarts",
    "started_at",
    "uptime_s",
    "exit_code",
    "last_exit",
    "supervised",
}


@pytest.fixture()
def cli_home(home):
    yield home
    run_cli(home, "down", "--all", "--timeout", "5")


def ps(home):
    r = run_cli(home, "ps", "--json")
    assert r.returncode == 0, r.stderr
    return {x["name"]: x for x in json.loads(r.stdout)}


def test_init_up_ps_health_logs_describe_down(cli_home, tiny_model, server_bin):
    home = cli_home
    r = run_cli(
        home,
        "init",
        "a",
        "--model",
        str(tiny_model),
        "--ctx",
        "512",
        "--parallel",
        "2",
        "--tag",
        "worker",
        "--",
        "--jinja",
    )
    assert r.returncode == 0, r.stderr
    cfg = json.loads(home.config_path("a").read_text())
    assert cfg["server"]["port"] >= 8001 and cfg["server"]["extra_args"] == ["--jinja"]

    r = run_cli(home, "up", "a")
    assert r.returncode == 0, r.stderr
    assert "a healthy (pid" in r.stdout
    row = ps(home)["a"]
    assert set(row) >= PS_KEYS
    assert row["state"] == "healthy" and row["supervised"] is True
    daemon = json.loads(run_cli(home, "daemon", "status", "--json").stdout)
    assert daemon["running"] and daemon["instances"] == ["a"]
    proc = psutil.Process(row["pid"])  # the daemon `up` started is its parent
    assert proc.is_running() and proc.ppid() == daemon["pid"]
    assert httpx.get(f"http://127.0.0.1:{row['port']}/health").status_code == 200

    assert run_cli(home, "health", "a").returncode == 0
    h = json.loads(run_cli(home, "health", "a", "--json").stdout)
    assert h["healthy"] is True and h["http_status"] == 200

    logs = run_cli(home, "logs", "a", "--tail", "5", "--stream", "stderr")
    assert logs.returncode == 0 and 0 < len(logs.stderr.splitlines()) <= 5

    d = json.loads(run_cli(home, "describe", "a", "--json").stdout)
    assert d["command"][d["command"].index("--port") + 1] == str(row["port"])
    assert [e["kind"] for e in d["events"]][-2:] == ["starting", "healthy"]

    r = run_cli(home, "down", "a")
    assert r.returncode == 0 and "a stopped" in r.stdout
    assert not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    assert ps(home)["a"]["state"] == "stopped"
    assert run_cli(home, "health", "a").returncode == 1

    ev = run_cli(home, "events", "a", "--json")
    kinds = [json.loads(line)["kind"] for line in ev.stdout.splitlines()]
    assert kinds == ["starting", "healthy", "stopping", "stopped"]


def test_logs_timestamps_and_since_tell_wall_clock_times_of_a_real_server(cli_home, tiny_model):
    """llama-server's own times count from its start; --timestamps makes them
    wall-clock (from the start line llama-orch writes), --since filters on them."""
    import time
    from datetime import datetime

    home = cli_home
    write_config(home, "a", tiny_model)
    before = time.time()
    assert run_cli(home, "up", "a", "--no-daemon").returncode == 0
    after = time.time()
    r = run_cli(home, "logs", "a", "--timestamps", "--stream", "stderr")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines[0][25:].startswith("--- llama-orch: process started at ")
    stamps = [datetime.fromisoformat(line[:23] + "+00:00").timestamp() for line in lines]
    assert before - 1 <= stamps[0] <= after
    assert all(s >= stamps[0] for s in stamps) and max(stamps) <= time.time()
    # llama.cpp's own relative prefix (M.SS.mmm.uuu) moved the clock on
    relative = [
        (s, ln)
        for s, ln in zip(stamps, lines, strict=True)
        if re.match(r"\S+Z \d+\.\d\d\.\d{3}\.", ln)
    ]
    assert relative and max(s for s, _ in relative) > stamps[0]
    plain = run_cli(home, "logs", "a", "--stream", "stderr").stderr.splitlines()
    assert [ln[25:] for ln in lines] == plain  # the same lines, a 24-character time before each
    future = datetime.fromtimestamp(time.time() + 3600).astimezone().isoformat()
    r = run_cli(home, "logs", "a", "--since", future, "--stream", "stderr")
    assert (r.returncode, r.stderr) == (0, "")
    r = run_cli(home, "logs", "a", "--since", "1h", "--tail", "2", "--stream", "stderr")
    assert r.stderr.splitlines() == plain[-2:]
    assert run_cli(home, "logs", "a", "--since", "soon").returncode == 2


def test_two_concurrent_ups_start_exactly_one_process(cli_home, tiny_model):
    write_config(cli_home, "a", tiny_model)
    cmd = [sys.executable, "-m", "llama_orchestrator", "--home", str(cli_home.root), "up", "a"]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    joined = "".join(o for o, _ in outs)
    assert joined.count("a healthy (pid") == 1 and joined.count("a is already running") == 1
    servers = [
        p
        for p in psutil.process_iter(["environ"])
        if (p.info["environ"] or {}).get("LLAMA_ORCH_INSTANCE") == "a"
        and (p.info["environ"] or {}).get("LLAMA_ORCH_HOME") == str(cli_home.root)
    ]
    assert len(servers) == 1


def test_up_all_and_down_all(cli_home, tiny_model):
    for n in ("x", "y"):
        write_config(cli_home, n, tiny_model)
    assert run_cli(cli_home, "up", "--all").returncode == 0
    assert {r["state"] for r in ps(cli_home).values()} == {"healthy"}
    pids = [r["pid"] for r in ps(cli_home).values()]
    r = run_cli(cli_home, "down", "--all")
    assert r.returncode == 0 and "x stopped" in r.stdout and "y stopped" in r.stdout
    assert not any(
        psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids
    )


def test_restart_gives_a_new_process(cli_home, tiny_model):
    write_config(cli_home, "a", tiny_model)
    assert run_cli(cli_home, "up", "a").returncode == 0
    old = ps(cli_home)["a"]["pid"]
    r = run_cli(cli_home, "restart", "a")
    assert r.returncode == 0, r.stderr
    new = ps(cli_home)["a"]
    assert new["state"] == "healthy" and new["pid"] != old


def test_rm_refuses_a_running_instance_without_force(cli_home, tiny_model):
    write_config(cli_home, "a", tiny_model)
    assert run_cli(cli_home, "up", "a").returncode == 0
    pid = ps(cli_home)["a"]["pid"]
    r = run_cli(cli_home, "rm", "a")
    assert r.returncode == 2 and "is running" in r.stderr
    r = run_cli(cli_home, "rm", "a", "--force")
    assert r.returncode == 0
    assert not cli_home.instance_dir("a").exists() and "a" not in ps(cli_home)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_up_of_a_server_that_exits_at_once_exits_1_with_code_and_stderr(cli_home, tiny_model):
    write_config(cli_home, "bad", tiny_model, server={"extra_args": ["--no-such-flag"]})
    r = run_cli(cli_home, "up", "bad")
    assert r.returncode == 1
    assert "exited with code 1 while starting" in r.stderr and "no-such-flag" in r.stderr
    assert "Traceback" not in r.stderr
    assert ps(cli_home)["bad"]["last_exit"]["code"] == 1


def test_up_timeout_exits_1_and_says_so(cli_home, tiny_model, fake_bin):
    write_config(cli_home, "slow", tiny_model, binary=str(fake_bin), env={"FAKE_HEALTH": "503"})
    r = run_cli(cli_home, "up", "slow", "--timeout", "1")
    assert r.returncode == 1 and "was not healthy within 1s" in r.stderr
    assert '| fake: "GET /health HTTP/1.1" 503' in r.stderr  # the server's own last words


def test_demo_runs_end_to_end_and_leaves_nothing(tmp_path, server_bin):
    """The demo shows the product: the daemon, two replicas behind the router,
    a request in the OpenAI wire format, a kill -9 and the restart; then it
    stops everything, the daemon too."""

    def ours() -> set[int]:  # this session's only: other workers start servers meanwhile
        return {
            p.pid
            for p in psutil.process_iter()
            if p.status() != psutil.STATUS_ZOMBIE
            and ("llama-server" in p.name() or "llama-orch-demo-" in " ".join(p.cmdline()))
            and in_this_session(p)
        }

    before = ours()
    r = run_cli(tmp_path / "unused-home", "demo", timeout=120)
    assert r.returncode == 0, r.stderr
    for text in (
        "Started the llama-orch daemon",
        "demo-a healthy",
        "demo-b healthy",
        "/v1/chat/completions  model='demo'",
        "/v1/models → ['demo']",
        "event exited   process",
        "was killed by signal 9 (SIGKILL)",
        "daemon stop --all",
        "nothing is left running",
        "llama-orch init my-model",
    ):
        assert text in r.stdout, text
    (killed,) = re.findall(r"kill -9 (\d+) \(demo-a\)", r.stdout)
    (new,) = re.findall(r"demo-a healthy again: new pid (\d+), restarts 1", r.stdout)
    assert killed != new
    assert ours() <= before  # no server and no daemon of the demo's home left


def test_the_demo_on_a_base_model_asks_for_a_completion_and_says_why(tmp_path, server_bin):
    from llama_orchestrator.models.tiny import write_tiny_model

    base = write_tiny_model(tmp_path / "base.gguf")  # no tokenizer.chat_template
    r = run_cli(tmp_path / "unused-home", "demo", "--model", str(base), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "the model has no chat template, so the demo asks for a plain completion" in r.stdout
    assert "/v1/completions  model='demo'" in r.stdout and "chat/completions  model" not in r.stdout
    chat = write_tiny_model(tmp_path / "chat.gguf", chat_template=CHATML)
    r = run_cli(tmp_path / "unused-home", "demo", "--model", str(chat), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "/v1/chat/completions  model='demo'" in r.stdout and "no chat template" not in r.stdout


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_ctrl_c_while_up_waits_stops_the_waiting_not_the_instance(cli_home, tiny_model, fake_bin):
    import signal

    write_config(cli_home, "slow", tiny_model, binary=str(fake_bin), env={"FAKE_HEALTH": "503"})
    cmd = [sys.executable, "-m", "llama_orchestrator", "--home", str(cli_home.root), "up", "slow"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: ps(cli_home)["slow"]["pid"], timeout=20)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert (
        proc.returncode == 130 and "Stopped waiting; slow keeps starting in the background" in err
    )
    assert "Traceback" not in err
    assert psutil.Process(ps(cli_home)["slow"]["pid"]).is_running()


@contextmanager
def following(home, *args):
    """Run `llama-orch ARGS` (a -f command) in the background; yield its stdout lines so far."""
    import threading

    cmd = [sys.executable, "-m", "llama_orchestrator", "--home", str(home.root), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines: list[str] = []

    def read():  # readline in the test itself would block it
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))

    threading.Thread(target=read, daemon=True).start()
    try:
        yield lines
    finally:
        proc.terminate()
        proc.wait(10)


def test_logs_follow_keeps_working_across_a_rotation(cli_home, tiny_model):
    from llama_orchestrator.engine.logs import rotate_if_needed

    write_config(cli_home, "a", tiny_model)
    assert run_cli(cli_home, "up", "a").returncode == 0
    stdout_log = cli_home.log_dir("a") / "stdout.log"
    with following(cli_home, "logs", "a", "-f", "--tail", "0", "--stream", "stdout") as lines:
        with open(stdout_log, "a") as f:  # stand-in for the server's writes, through an append fd

            def ping() -> bool:  # until the follower is reading (it starts at the end)
                f.write("ping\n")
                f.flush()
                return "ping" in lines

            wait_until(ping, timeout=20, interval=0.1)
            rotate_if_needed(stdout_log, max_bytes=1, backups=1)  # copy-truncate under the follower
            f.write("after rotation\n")  # refills past the follower's old position at once
            f.flush()
        wait_until(lambda: "after rotation" in lines)


def test_events_follow_shows_new_transitions_live(cli_home, tiny_model):
    write_config(cli_home, "a", tiny_model)
    with following(cli_home, "events", "-f", "--json") as lines:
        assert run_cli(cli_home, "up", "a").returncode == 0
        wait_until(
            lambda: (
                [json.loads(x)["kind"] for x in lines if json.loads(x)["instance"] == "a"]
                == ["starting", "healthy"]
            )
        )
        assert {"ts", "instance", "kind", "message", "data"} <= set(json.loads(lines[0]))
        assert json.loads(lines[0])["kind"] == "daemon_started"  # `up` started the daemon


def test_up_no_daemon_runs_the_instance_unsupervised(home, tiny_model):
    from llama_orchestrator.daemon.info import lock_is_held

    write_config(home, "a", tiny_model)
    r = run_cli(home, "up", "a", "--no-daemon")
    assert r.returncode == 0, r.stderr
    assert not lock_is_held(home) and "daemon" not in r.stderr  # none was started
    text = run_cli(home, "ps").stdout
    assert "healthy*" in text and "* unsupervised" in text
    assert ps(home)["a"]["supervised"] is False
    assert run_cli(home, "down", "a").returncode == 0


def test_init_force_on_a_running_instance_keeps_it_reachable_until_restart(cli_home, tiny_model):
    """Issue 23.5: a re-init keeps the port and alias, says when it applies,
    and ps/describe show where the process really listens, marked changed."""
    home = cli_home
    r = run_cli(home, "init", "a", "--model", str(tiny_model), "--ctx", "512", "--alias", "chat")
    assert r.returncode == 0, r.stderr
    assert run_cli(home, "up", "a", "--no-daemon").returncode == 0
    port = ps(home)["a"]["port"]
    r = run_cli(home, "init", "a", "--force", "--ctx", "256")
    assert r.returncode == 0, r.stderr
    assert "takes effect at the next restart (llama-orch restart a)" in r.stdout
    cfg = json.loads(home.config_path("a").read_text())
    assert (cfg["server"]["port"], cfg["model"]["alias"]) == (port, "chat")
    a = ps(home)["a"]
    assert (a["state"], a["port"], a["config_changed"]) == ("healthy", port, True)
    text = run_cli(home, "ps").stdout
    assert "(config changed)" in text and "llama-orch restart a" in text
    # an explicit new port: ps still shows (and probes) the one the process has
    r = run_cli(home, "init", "a", "--force", "--port", str(port + 100))
    assert r.returncode == 0, r.stderr
    a = ps(home)["a"]
    assert (a["state"], a["port"], a["config_changed"]) == ("healthy", port, True)
    assert "config changed" in run_cli(home, "describe", "a").stdout
    assert run_cli(home, "restart", "a").returncode == 0  # no daemon runs: here
    a = ps(home)["a"]
    assert (a["state"], a["port"], a["config_changed"]) == ("healthy", port + 100, False)


def test_ps_shows_what_it_sees_but_writes_nothing(home, tiny_model, fake_bin):
    """An unsupervised server whose /health fails shows `unhealthy` in ps, and
    its row is not changed by looking (only the owner of a run writes it)."""
    write_config(home, "a", tiny_model, binary=str(fake_bin), env={"FAKE_HEALTH": "500"})
    assert run_cli(home, "up", "a", "--no-daemon", "--no-wait").returncode == 0
    store = Store.open(home.db_path)
    try:
        before = store.get("a")
        assert ps(home)["a"]["state"] == "unhealthy"
        after = store.get("a")
        assert (after.state, after.updated_at) == (before.state, before.updated_at)
        assert [e.kind for e in store.events("a")] == ["starting"]
    finally:
        store.close()
    assert run_cli(home, "down", "a").returncode == 0


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes")
def test_state_logs_and_plans_are_private_to_their_owner(cli_home, tiny_model):
    """Issue 24.7: prompts, outputs and events are not readable by other local users."""
    import os
    import stat

    from llama_orchestrator.plans.records import RunFiles
    from llama_orchestrator.plans.spec import parse_plan

    home = cli_home
    home.logs_dir.mkdir(mode=0o755)  # from an older version: narrowed too
    os.chmod(home.logs_dir, 0o755)
    write_config(home, "a", tiny_model)
    old = os.umask(0o022)
    try:
        assert run_cli(home, "up", "a", "--no-daemon").returncode == 0
        text = json.dumps({"tasks": [{"id": "t", "kind": "shell", "command": ["true"]}]})
        plan = parse_plan(text, "plan.json", known_models=set())
        RunFiles(home.plan_run_dir("r1")).create(plan, "{}")
    finally:
        os.umask(old)
    for folder in (home.state_dir, home.logs_dir, home.root / "plans"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
