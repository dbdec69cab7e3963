"""The daemon's side of plan tasks on a peer, where ssh cannot get there:
each way it fails is the task's error, in one sentence (the way it works
is tests/integration/test_hosts.py, on real hosts over a real sshd)."""

from __future__ import annotations

import json
import sys

import pytest

from llama_orchestrator.config.settings import PeerSettings
from llama_orchestrator.daemon.hosttasks import HostTasks
from llama_orchestrator.plans.spec import parse_plan

pytestmark = pytest.mark.posix


def task():
    text = json.dumps({"tasks": [{"id": "t", "kind": "shell", "command": ["x"], "host": "rig2"}]})
    return parse_plan(text, "p.json", known_models=set(), hosts={"rig2"}).tasks[0]


def peer(ssh: str | None) -> PeerSettings:
    return PeerSettings(name="rig2", url="http://10.0.0.2:8080", ssh=ssh)


async def attempt(hosts: HostTasks, tmp_path) -> dict:
    pids: list[int] = []
    result = await hosts.run(
        "r1", task(), ["x"], tmp_path / "t.out", tmp_path / "t.err", pids.append
    )
    return {**result, "pids": pids}


def test_only_peers_with_an_ssh_address_run_tasks():
    hosts = HostTasks([peer(None), PeerSettings(name="c", url="http://c:1", ssh="ssh://me@c/h")])
    assert hosts.names() == {"c"}
    target = hosts.target("c")
    assert (target.destination, target.home, target.name) == ("me@c", "/h", "c")


def test_a_peers_ssh_may_be_a_context(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    from llama_orchestrator.hosts.contexts import Context, Contexts

    Contexts().create(Context("rigctx", "ssh://ops@10.0.0.2:2222/srv/llm"))
    target = HostTasks([peer("rigctx")]).target("rig2")
    assert (target.destination, target.port, target.home) == ("ops@10.0.0.2", 2222, "/srv/llm")
    assert target.name == "rig2"  # named as the plan names it


def test_an_ssh_address_that_is_neither_is_refused_in_the_settings():
    with pytest.raises(ValueError, match="ssh://user@host/path/to/home"):
        peer("not a host")
    with pytest.raises(ValueError, match="is not one llama-orch can reach by ssh"):
        peer("ssh://")


async def test_a_context_that_does_not_exist_is_the_tasks_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    got = await attempt(HostTasks([peer("gone")]), tmp_path)
    assert "There is no context 'gone'" in got["error"] and got["pids"] == []


async def test_no_ssh_client_is_the_tasks_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_ORCH_SSH_COMMAND", str(tmp_path / "no-ssh-here"))
    got = await attempt(HostTasks([peer("ssh://me@rig2/h")]), tmp_path)
    assert got["error"] == f"There is no `{tmp_path / 'no-ssh-here'}` here to reach rig2."


async def test_ssh_failing_says_what_it_said(tmp_path, monkeypatch):
    fake = tmp_path / "ssh"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        "sys.stderr.write('ssh: connect to host rig2 port 22: Connection refused\\n')\n"
        "sys.exit(255)\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("LLAMA_ORCH_SSH_COMMAND", str(fake))
    got = await attempt(HostTasks([peer("ssh://me@rig2/h")]), tmp_path)
    assert got["error"].startswith("rig2 refused the connection: no SSH server listens")
    assert len(got["pids"]) == 1  # recorded, as a shell task's process is
