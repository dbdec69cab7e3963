"""Several machines, for real: hosts B and C are network namespaces with
their own homes, daemons and real sshd (tests/netns.py); this process is
host A. `--host ssh://` runs commands there through the system's OpenSSH
client, and A's router serves B's and C's real llama-servers as peers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from llama_orchestrator.daemon.main import stop as stop_daemon
from llama_orchestrator.home import Home
from tests.helpers import free_port, run_cli, wait_until
from tests.netns import SSHD, Hosts, why_not

pytestmark = [pytest.mark.integration, pytest.mark.posix]

_WHY_NOT = why_not()
if _WHY_NOT:
    pytest.skip(f"no extra hosts here: {_WHY_NOT}", allow_module_level=True)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    hosts = Hosts(tmp_path_factory.mktemp("hosts"))
    try:
        yield hosts
    finally:
        for h in hosts.hosts:
            stop_daemon(Home(h.home), all_=True)  # the control socket is a file: reached from here
        hosts.close()


def instance(host, name: str, model: Path, alias: str, port: int) -> None:
    cfg = {
        "model": {"path": str(model), "context_size": 512, "alias": alias, "threads": 1},
        "server": {"host": "127.0.0.1", "port": port, "parallel": 2},
        "healthcheck": {"interval": 0.5, "start_period": 30},
        "stop_timeout": 5,
    }
    path = host.home / "instances" / name / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))


def cli(
    *args: str, timeout: float = 120, input: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """`llama-orch ARGS` on A, as a user types it (no --home)."""
    return subprocess.run(
        [sys.executable, "-m", "llama_orchestrator", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        env={**os.environ, **env},
    )


def over_ssh(net, host, *args, config=None, url=None, timeout=120, input=None):
    """`llama-orch --host ssh://root@<host>/<its home> ARGS` from A."""
    config = config or net.ssh_config()
    return cli(
        "--host",
        url or f"ssh://root@{host.addr}{host.home}",
        *args,
        timeout=timeout,
        input=input,
        LLAMA_ORCH_SSH_COMMAND=f"ssh -F {config}",
    )


def test_commands_run_on_another_host_over_ssh(net, tiny_model, server_bin, monkeypatch):
    if not Path(SSHD).is_file() or not shutil.which("ssh"):
        pytest.skip(
            "Debian's openssh-server and openssh-client are not installed (.ci/run installs them)"
        )
    b = net.add("s")
    net.start_sshd(b)
    port = free_port()
    r = over_ssh(
        net, b, "init", "tiny", "--model", str(tiny_model), "--port", str(port), "--ctx", "512"
    )
    assert r.returncode == 0, r.stderr
    assert (b.home / "instances" / "tiny" / "config.json").is_file()  # written there
    r = over_ssh(net, b, "up", "tiny", "--timeout", "60")
    assert r.returncode == 0, r.stderr
    r = over_ssh(net, b, "ps", "--json")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert row["state"] == "healthy" and row["machine"] == b.addr and row["port"] == port
    assert {"name", "desired", "pid", "host", "supervised"} <= set(row)  # the keys of local ps
    # it runs on B: in B's network namespace, supervised by B's daemon
    server = psutil.Process(row["pid"])
    assert os.readlink(f"/proc/{server.pid}/ns/net") != os.readlink("/proc/self/ns/net")
    assert row["supervised"]
    r = over_ssh(net, b, "logs", "tiny", "--tail", "50", "--stream", "stderr")
    # the server's stderr comes out on ours, as `docker logs` does
    assert r.returncode == 0 and f"listening on http://127.0.0.1:{port}" in r.stderr, r.stderr[
        -500:
    ]
    # what else a user runs there: describe, gpus, daemon status, and a local plan sent along
    r = over_ssh(net, b, "describe", "tiny", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["pid"] == row["pid"], r.stderr
    r = over_ssh(net, b, "gpus", "--json")
    assert r.returncode == 0 and isinstance(json.loads(r.stdout), list), r.stderr
    r = over_ssh(net, b, "daemon", "status", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["home"] == str(b.home), r.stderr
    plan = {
        "tasks": [{"id": "hi", "kind": "llm", "model": "tiny", "prompt": "Hi", "max_tokens": 2}]
    }
    r = over_ssh(net, b, "plan", "run", "-", "--wait", input=json.dumps(plan))
    assert r.returncode == 0 and "1 completed" in r.stdout, r.stdout + r.stderr
    r = over_ssh(net, b, "plan", "run", "plan.json")
    assert r.returncode == 2 and "`plan run - < plan.json` sends one from here" in r.stderr

    # `logs -f` there, without a terminal (piped): stopping it here ends it there
    config = net.ssh_config()
    follow = subprocess.Popen(
        [sys.executable, "-m", "llama_orchestrator", "--host", f"ssh://root@{b.addr}{b.home}"]
        + ["logs", "tiny", "-f"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "LLAMA_ORCH_SSH_COMMAND": f"ssh -F {config}"},
    )

    def there() -> list[psutil.Process]:
        assert b.sshd is not None
        found = []
        for p in psutil.Process(b.sshd.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):  # one that ended meanwhile
                if p.cmdline()[-3:-1] == ["system", "remote"]:
                    found.append(p)
        return found

    (far,) = wait_until(there, timeout=30)
    follow.send_signal(signal.SIGINT)  # ^C
    assert follow.wait(30) == 130
    wait_until(lambda: not far.is_running() or far.status() == psutil.STATUS_ZOMBIE, timeout=15)

    r = over_ssh(net, b, "down", "tiny")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: not server.is_running() or server.status() == psutil.STATUS_ZOMBIE)
    r = over_ssh(net, b, "ps", "--json")
    assert json.loads(r.stdout)[0]["state"] == "stopped"

    # a key B does not know: one sentence, exit 2, no traceback
    r = over_ssh(net, b, "ps", config=net.ssh_config(key="stranger"))
    assert r.returncode == 2 and "refused the SSH login for root@" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    # B's host key is not the one recorded: refused
    r = over_ssh(net, b, "ps", config=net.ssh_config(host_key="impostor"))
    assert r.returncode == 2 and "host key of" in r.stderr and "has changed" in r.stderr, r.stderr
    # no llama-orch there (as ssh would run it)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(net.base / "xdg"))
    r = cli(
        "context",
        "create",
        "bare",
        "--host",
        f"ssh://root@{b.addr}",
        "--remote-command",
        "/nowhere/llama-orch",
    )
    assert r.returncode == 0, r.stderr
    r = over_ssh(net, b, "ps", url="bare")
    assert r.returncode == 2 and "has no `/nowhere/llama-orch`" in r.stderr, r.stderr
    # a context is used by name and by `context use`
    r = cli(
        "context",
        "create",
        "rig",
        "--host",
        f"ssh://root@{b.addr}{b.home}",
        "--remote-command",
        str(Path(sys.executable).parent / "llama-orch"),
    )
    assert r.returncode == 0, r.stderr
    assert cli("context", "use", "rig").returncode == 0
    r = cli("ps", "--json", LLAMA_ORCH_SSH_COMMAND=f"ssh -F {net.ssh_config()}")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["machine"] == "rig", r.stderr


def _requests_by(url: str, key: str, instance: str) -> float:
    """Requests A's router sent to `instance` (its Prometheus counter)."""
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"}).text
    total = 0.0
    for line in text.splitlines():
        if (
            line.startswith("llama_orch_router_requests_total{")
            and f'instance="{instance}"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_one_router_across_hosts_survives_a_cut_link(net, tmp_path, tiny_model, server_bin):
    b, c = net.add("b"), net.add("c")
    keys = {"b": "key-of-a-at-b", "c": "key-of-a-at-c"}
    for h, (own, shared) in ((b, ("bee", "tiny")), (c, ("sea", "tiny"))):
        h.home.joinpath("llama-orch.json").write_text(
            json.dumps({"router": {"host": h.addr, "port": 8080, "api_keys": [keys[h.name]]}})
        )
        instance(h, own, tiny_model, own, 8001)
        instance(h, "tiny", tiny_model, shared, 8002)
        r = h.cli("up", own, "tiny", "--timeout", "60")
        assert r.returncode == 0, r.stderr
    a = Home(tmp_path / "a")
    a.instances_dir.mkdir(parents=True)
    port = free_port()
    peers = []
    for h in (b, c):
        (a.root / f"{h.name}.key").write_text(keys[h.name])
        peers.append(
            {
                "name": h.name,
                "url": f"http://{h.addr}:8080",
                "api_key_file": f"{h.name}.key",
                "refresh": 0.5,
                "timeout": 1,
            }
        )
    a.settings_path.write_text(
        json.dumps({"router": {"port": port, "api_keys": ["client-key"]}, "peers": peers})
    )
    url = f"http://127.0.0.1:{port}"
    try:
        r = run_cli(a, "daemon", "start")
        assert r.returncode == 0, r.stderr
        client = openai.OpenAI(
            base_url=f"{url}/v1", api_key="client-key", max_retries=0, timeout=60
        )

        def where() -> dict[str, list[str]]:
            return {m.id: m.model_extra["hosts"] for m in client.models.list().data}

        wait_until(lambda: where() == {"bee": ["b"], "sea": ["c"], "tiny": ["b", "c"]}, timeout=30)
        # every host's instances, as each one's own ps has them, with where they run
        r = run_cli(a, "ps", "--all-hosts", "--json")
        assert r.returncode == 0, r.stderr
        seen = {(row["machine"], row["name"]): row for row in json.loads(r.stdout)}
        assert set(seen) == {("b", "bee"), ("b", "tiny"), ("c", "sea"), ("c", "tiny")}
        assert all(row["state"] == "healthy" for row in seen.values())
        assert seen[("c", "sea")]["port"] == 8001 and seen[("b", "tiny")]["alias"] == "tiny"
        table = run_cli(a, "ps", "--all-hosts").stdout.splitlines()
        assert table[0].split()[:3] == ["HOST", "NAME", "STATE"], table
        assert sorted(line.split()[:2] for line in table[1:]) == sorted(map(list, seen))
        for model in ("bee", "sea", "tiny"):  # the official client reaches each, wherever it runs
            answer = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
            )
            assert answer.choices[0].message.content is not None
        # nothing is accepted from a peer without its key, and no control verb is there
        assert httpx.get(f"http://{b.addr}:8080/v1/peer/state").status_code == 401
        # (an unknown path goes to an instance, as every llama-server path does: it
        # names no model, and several are served)
        control = httpx.post(
            f"http://{b.addr}:8080/v1/up", headers={"Authorization": f"Bearer {keys['b']}"}
        )
        assert control.status_code in (400, 404) and "error" in control.json()

        failures: list[str] = []
        done = [0]
        lock = threading.Lock()
        stop = threading.Event()

        def worker() -> None:
            while not stop.is_set():
                with lock:
                    done[0] += 1
                    i = done[0]
                try:
                    client.chat.completions.create(
                        model="tiny",
                        messages=[{"role": "user", "content": f"Hi {i}"}],
                        max_tokens=4,
                    )
                except Exception as exc:  # noqa: BLE001 - every failure counts
                    failures.append(f"{i}: {type(exc).__name__}: {exc}")

        def count() -> int:
            with lock:
                return done[0]

        # the load, at concurrency 8: 100 requests, then B's cable is pulled;
        # 100 while A skips B, then it is plugged in again; 100 once A uses B again
        workers = [threading.Thread(target=worker) for _ in range(8)]
        for w in workers:
            w.start()
        try:
            wait_until(lambda: count() >= 100, timeout=60)
            assert _requests_by(url, "client-key", "tiny@b") > 0  # B took its share
            b.cut()
            wait_until(lambda: where().get("tiny") == ["c"], timeout=15)  # skipped while away
            r = run_cli(a, "ps", "--all-hosts", "--json")
            assert r.returncode == 0 and {row["machine"] for row in json.loads(r.stdout)} == {"c"}
            assert "warning: peer b: http://" in r.stderr and "does not answer" in r.stderr
            said = json.loads(run_cli(a, "daemon", "status", "--json").stdout)["peers"]
            assert (said["b"]["state"], said["c"]["state"]) == ("unreachable", "reachable")
            assert (
                f"peer         b (http://{b.addr}:8080): does not answer: "
                in run_cli(a, "daemon", "status").stdout
            )
            at_cut = count()
            wait_until(lambda: count() >= at_cut + 100, timeout=60)
            b.restore()
            wait_until(lambda: where().get("tiny") == ["b", "c"], timeout=15)  # and back
            back_at, at_back = _requests_by(url, "client-key", "tiny@b"), count()
            wait_until(lambda: count() >= at_back + 100, timeout=60)
        finally:
            stop.set()
            for w in workers:
                w.join(120)
        assert count() >= 300 and failures == [], failures[:5]
        assert _requests_by(url, "client-key", "tiny@b") > back_at  # used again
    finally:
        stop_daemon(a, all_=True)
        for h in (b, c):
            stop_daemon(Home(h.home), all_=True)


#: a task for host C: it binds C's address (which exists in C's network
#: namespace alone), says it started, waits for the test's go, and counts its runs
ON_C = """
import os, socket, sys, time
addr, folder = sys.argv[1], sys.argv[2]
with socket.socket() as s:
    s.bind((addr, 0))
with open(os.path.join(folder, "runs"), "a") as f:
    f.write("ran\\n")
open(os.path.join(folder, "started"), "w").close()
while not os.path.exists(os.path.join(folder, "go")):
    time.sleep(0.05)
print("bound", addr, "in the namespace of C")
print("x" * 100_000)  # the output comes back as one line: longer than asyncio's 64 KiB
"""


def test_a_plan_runs_where_its_models_and_hosts_are(net, tmp_path, tiny_model, server_bin):
    """llm tasks on B and C through A's router, a shell task on C through C's
    daemon (over ssh), its output back into A's plan; A's daemon killed -9
    while the task runs on C: the next one follows C's run, never runs it twice."""
    if not Path(SSHD).is_file() or not shutil.which("ssh"):
        pytest.skip("Debian's openssh-server and openssh-client are not installed")
    b, c = net.add("pb"), net.add("pc")
    net.start_sshd(c)
    for h, model in ((b, "bee"), (c, "sea")):
        h.home.joinpath("llama-orch.json").write_text(
            json.dumps({"router": {"host": h.addr, "port": 8080, "api_keys": [f"key-{h.name}"]}})
        )
        instance(h, model, tiny_model, model, 8001)
        r = h.cli("up", model, "--timeout", "60")
        assert r.returncode == 0, r.stderr
    a = Home(tmp_path / "a")
    a.instances_dir.mkdir(parents=True)
    peers = []
    for h in (b, c):
        (a.root / f"{h.name}.key").write_text(f"key-{h.name}")
        peers.append(
            {"name": h.name, "url": f"http://{h.addr}:8080", "api_key_file": f"{h.name}.key"}
        )
    peers[1]["ssh"] = f"ssh://root@{c.addr}{c.home}"  # C runs A's tasks too
    a.settings_path.write_text(
        json.dumps(
            {"router": {"port": free_port()}, "peers": [{**p, "refresh": 0.5} for p in peers]}
        )
    )
    ssh_env = {"LLAMA_ORCH_SSH_COMMAND": f"ssh -F {net.ssh_config()}"}
    shared = tmp_path / "on-c"  # C's files are A's: the same file system
    shared.mkdir()
    plan = tmp_path / "plan.json"
    plan.write_text(
        json.dumps(
            {
                "name": "across",
                "tasks": [
                    {"id": "ask-b", "kind": "llm", "model": "bee", "prompt": "Hi", "max_tokens": 4},
                    {"id": "ask-c", "kind": "llm", "model": "sea", "prompt": "Hi", "max_tokens": 4},
                    {
                        "id": "on-c",
                        "kind": "shell",
                        "host": "pc",
                        "depends_on": ["ask-b", "ask-c"],
                        "command": [sys.executable, "-c", ON_C, c.addr, str(shared)],
                        "timeout": 120,
                    },
                    {
                        "id": "back",
                        "kind": "shell",
                        "depends_on": ["on-c"],
                        "command": [
                            sys.executable,
                            "-c",
                            "import sys; print('got:', sys.argv[1])",
                            "{{on-c}}",
                        ],
                    },
                ],
            }
        )
    )

    def daemon_pid() -> int:
        r = run_cli(a, "daemon", "status", "--json")
        return int(json.loads(r.stdout)["pid"])

    def tasks(run_id: str) -> dict[str, dict]:
        r = run_cli(a, "plan", "status", run_id, "--json")
        assert r.returncode == 0, r.stderr
        return {t["id"]: t for t in json.loads(r.stdout)["tasks"]}

    try:
        r = run_cli(a, "daemon", "start", env=ssh_env)
        assert r.returncode == 0, r.stderr
        r = run_cli(a, "plan", "run", str(plan), env=ssh_env)
        assert r.returncode == 0, r.stderr
        run_id = r.stdout.split()[0]
        wait_until(lambda: (shared / "started").exists(), timeout=90)
        assert tasks(run_id)["on-c"]["state"] == "running"
        # A's daemon dies while the task runs on C, which goes on with it
        first = psutil.Process(daemon_pid())
        (ssh,) = [p for p in first.children() if p.name() == "ssh"]  # the task's link to C
        first.kill()
        first.wait(10)
        r = c.cli("plan", "list", "--json")
        (there,) = [p for p in json.loads(r.stdout) if p["name"].startswith(f"{run_id}/on-c from ")]
        assert there["state"] == "running"
        r = run_cli(a, "daemon", "start", env=ssh_env)
        assert r.returncode == 0, r.stderr
        wait_until(lambda: not ssh.is_running(), timeout=15)  # the dead daemon's, ended
        (shared / "go").touch()
        done = wait_until(
            lambda: (
                (t := tasks(run_id))["back"]["state"] in ("completed", "failed", "skipped") and t
            ),
            timeout=120,
            interval=0.3,
        )
        assert {k: v["state"] for k, v in done.items()} == dict.fromkeys(done, "completed"), done
        # the llm tasks ran where their models are, through A's router
        assert done["ask-b"]["instance"] == "bee@pb" and done["ask-c"]["instance"] == "sea@pc"
        assert done["on-c"]["instance"] == f"pc (run {there['id']})"  # where to look on C
        # the shell task ran on C, once (the resumed daemon followed C's run),
        # and its output came back into the plan
        out = (a.plan_run_dir(run_id) / "on-c.out").read_text()
        assert out.splitlines() == [f"bound {c.addr} in the namespace of C", "x" * 100_000]
        assert (shared / "runs").read_text() == "ran\n"
        assert (a.plan_run_dir(run_id) / "back.out").read_text() == f"got: {out}\n"
        r = c.cli("plan", "list", "--json")
        (there,) = [p for p in json.loads(r.stdout) if p["name"].startswith(f"{run_id}/on-c from ")]
        assert there["state"] == "completed"

        # a task cancelled here is cancelled there
        for name in ("started", "go"):
            (shared / name).unlink()
        alone = json.loads(plan.read_text())["tasks"][2]
        plan.write_text(json.dumps({"tasks": [{**alone, "depends_on": []}]}))
        r = run_cli(a, "plan", "run", str(plan), env=ssh_env)
        assert r.returncode == 0, r.stderr
        second = r.stdout.split()[0]
        wait_until(lambda: (shared / "started").exists(), timeout=60)
        assert run_cli(a, "plan", "cancel", second).returncode == 0

        def state_there() -> str:
            runs = json.loads(c.cli("plan", "list", "--json").stdout)
            return next(p["state"] for p in runs if p["name"].startswith(f"{second}/on-c from "))

        wait_until(lambda: state_there() == "cancelled", timeout=30, interval=0.3)
    finally:
        stop_daemon(a, all_=True)
        for h in (b, c):
            stop_daemon(Home(h.home), all_=True)


def test_a_task_on_a_host_that_is_lost_fails_naming_it_not_at_its_timeout(net, tmp_path):
    if not Path(SSHD).is_file() or not shutil.which("ssh"):
        pytest.skip("Debian's openssh-server and openssh-client are not installed")
    d = net.add("pd")
    net.start_sshd(d)
    a = Home(tmp_path / "a")
    a.instances_dir.mkdir(parents=True)
    peer = {"name": "pd", "url": f"http://{d.addr}:8080", "ssh": f"ssh://root@{d.addr}{d.home}"}
    a.settings_path.write_text(json.dumps({"router": {"port": free_port()}, "peers": [peer]}))
    started = tmp_path / "started"  # D's files are A's: the same file system
    wait = "import pathlib, sys, time; pathlib.Path(sys.argv[1]).touch(); time.sleep(600)"
    plan = tmp_path / "plan.json"
    task = {"id": "on-d", "kind": "shell", "host": "pd", "timeout": 600, "retries": 0}
    task["command"] = [sys.executable, "-c", wait, str(started)]
    plan.write_text(json.dumps({"name": "lost", "tasks": [task]}))
    ssh_env = {"LLAMA_ORCH_SSH_COMMAND": f"ssh -F {net.ssh_config()}"}
    try:
        assert run_cli(a, "daemon", "start", env=ssh_env).returncode == 0
        r = run_cli(a, "plan", "run", str(plan), env=ssh_env)
        assert r.returncode == 0, r.stderr
        run_id = r.stdout.split()[0]
        wait_until(started.exists, timeout=60)
        d.cut()  # D is gone: no answer, no reset
        task_now = wait_until(
            lambda: (
                (t := json.loads(run_cli(a, "plan", "status", run_id, "--json").stdout)["tasks"][0])
                and t["state"] in ("failed", "completed")
                and t
            ),
            timeout=90,  # its own timeout is 600 s
            interval=0.5,
        )
        assert task_now["state"] == "failed"
        assert "The SSH connection to pd was lost" in task_now["error"], task_now["error"]
    finally:
        d.restore()
        stop_daemon(a, all_=True)
