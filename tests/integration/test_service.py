"""service install/uninstall/status with fake managers on PATH that record
their argv; systemd-analyze on the real unit; the unit's ExecStart for real."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llama_orchestrator.errors import UserError
from llama_orchestrator.service import manage
from llama_orchestrator.service import spec as sp
from llama_orchestrator.states import InstanceState as S
from llama_orchestrator.store.database import Store
from tests.helpers import run_cli, wait_until, write_config

FAKE_TOOL = Path(__file__).parent.parent / "fakes" / "fake_tool.py"


@pytest.fixture()
def tools(tmp_path, monkeypatch):
    """A bin folder with fake systemctl, nssm and schtasks; returns a reader of their calls."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("systemctl", "nssm", "schtasks"):
        path = bindir / name
        path.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE_TOOL} {name} "$@"\n')
        path.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_TOOL_LOG", str(log))

    def calls() -> list[list[str]]:
        if not log.exists():
            return []
        return [json.loads(x) for x in log.read_text().splitlines()]

    calls.bindir = bindir  # type: ignore[attr-defined]
    return calls


def host_for(tmp_path: Path, bindir: Path, **changes) -> manage.Host:
    base = manage.Host(
        windows=False,
        root=True,
        systemd_running=True,
        config_home=tmp_path / "config",
        account="llm",
        group="llm",
        system_unit_dir=tmp_path / "etc-systemd",
        which=lambda name: shutil.which(name, path=str(bindir)),
    )
    return manage.Host(**{**base.__dict__, **changes})


def carry_out(plan: sp.Plan, host: manage.Host) -> list[str]:
    said: list[str] = []
    manage.execute(plan, host, said.append)
    return said


def test_systemd_install_status_uninstall_issue_exactly_these_calls(home, tmp_path, tools):
    host = host_for(tmp_path, tools.bindir)
    t, plan = manage.install(
        home, manager=None, name="llama-orch", user=False, force=False, dry_run=False, host=host
    )
    carry_out(plan, host)
    unit = tmp_path / "etc-systemd" / "llama-orch.service"
    assert t.manager == "systemd" and unit.read_text() == sp.systemd_unit(t.spec)
    assert "User=llm" in unit.read_text() and f"--home {home.root}" in unit.read_text()
    assert tools() == [
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", "--now", "llama-orch.service"],
    ]

    st = manage.status(home, manager=None, name="llama-orch", user=False, host=host)
    assert (st["installed"], st["enabled"], st["active"]) == (True, "enabled", "active")
    assert tools()[2:] == [
        ["systemctl", "is-enabled", "llama-orch.service"],
        ["systemctl", "is-active", "llama-orch.service"],
        ["systemctl", "status", "--no-pager", "--lines", "5", "llama-orch.service"],
    ]

    with pytest.raises(UserError, match="already installed .*--force"):
        manage.install(
            home, manager=None, name="llama-orch", user=False, force=False, dry_run=False, host=host
        )

    _, plan = manage.uninstall(
        home, manager=None, name="llama-orch", user=False, dry_run=False, host=host
    )
    carry_out(plan, host)
    assert not unit.exists()
    assert tools()[5:] == [
        ["systemctl", "disable", "--now", "llama-orch.service"],
        ["systemctl", "daemon-reload"],
    ]
    with pytest.raises(UserError, match="No service 'llama-orch' is installed"):
        manage.uninstall(
            home, manager=None, name="llama-orch", user=False, dry_run=False, host=host
        )


def test_systemd_user_install_goes_to_the_user_unit_folder(home, tmp_path, tools):
    host = host_for(tmp_path, tools.bindir, root=False)
    t, plan = manage.install(
        home, manager="systemd", name="llm", user=True, force=False, dry_run=False, host=host
    )
    said = carry_out(plan, host)
    assert Path(t.path) == tmp_path / "config" / "systemd" / "user" / "llm.service"
    assert Path(t.path).exists() and "User=" not in Path(t.path).read_text()
    assert tools() == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", "llm.service"],
    ]
    assert said[0] == f"Wrote {t.path}"
    assert any("enable-linger" in n for n in plan.notes)


@pytest.mark.parametrize(
    ("changes", "user", "message"),
    [
        ({"root": False}, False, "needs root"),
        ({"systemd_running": False}, False, "systemd is not running"),
        ({"systemd_running": False}, True, "systemd is not running"),
    ],
)
def test_systemd_refusals(home, tmp_path, tools, changes, user, message):
    host = host_for(tmp_path, tools.bindir, **changes)
    with pytest.raises(UserError, match=message):
        manage.install(
            home,
            manager="systemd",
            name="llama-orch",
            user=user,
            force=False,
            dry_run=False,
            host=host,
        )
    assert tools() == [] and not (tmp_path / "etc-systemd").exists()


def test_nssm_install_runs_the_commands_and_force_replaces(home, tmp_path, tools):
    host = host_for(tmp_path, tools.bindir, windows=True)
    t, plan = manage.install(
        home, manager=None, name="llama-orch", user=False, force=False, dry_run=False, host=host
    )
    assert t.manager == "nssm"
    carry_out(plan, host)
    calls = tools()
    assert calls[0] == ["nssm", "status", "llama-orch"]  # installed already?
    assert calls[1:] == sp.nssm_install(t.spec).commands
    with pytest.raises(UserError, match="already installed"):
        manage.install(
            home,
            manager="nssm",
            name="llama-orch",
            user=False,
            force=False,
            dry_run=False,
            host=host,
        )
    before = len(tools())
    _, plan = manage.install(
        home, manager="nssm", name="llama-orch", user=False, force=True, dry_run=False, host=host
    )
    carry_out(plan, host)
    assert tools()[before + 1 : before + 4] == [
        ["nssm", "stop", "llama-orch"],
        ["nssm", "remove", "llama-orch", "confirm"],
        ["nssm", "install", "llama-orch", sys.executable],
    ]
    assert (
        manage.status(home, manager="nssm", name="llama-orch", user=False, host=host)["active"]
        == "SERVICE_RUNNING"
    )


def test_nssm_missing_prints_the_commands_and_where_to_get_it(home, tmp_path):
    host = host_for(tmp_path, tmp_path / "empty-bin", windows=True)
    with pytest.raises(UserError) as exc:
        manage.install(
            home,
            manager="nssm",
            name="llama-orch",
            user=False,
            force=False,
            dry_run=False,
            host=host,
        )
    assert sp.NSSM_URL in str(exc.value) and "nssm set llama-orch AppKillProcessTree 0" in str(
        exc.value
    )
    with pytest.raises(UserError, match="no per-user mode"):
        manage.install(
            home, manager="nssm", name="x", user=True, force=False, dry_run=False, host=host
        )


def test_schtasks_install_status_uninstall(home, tmp_path, tools):
    host = host_for(tmp_path, tools.bindir, windows=True, account="PC\\me")
    t, plan = manage.install(
        home,
        manager="schtasks",
        name="llama-orch",
        user=True,
        force=False,
        dry_run=False,
        host=host,
    )
    carry_out(plan, host)
    xml = Path(t.path)
    assert (
        xml.read_text() == sp.schtasks_xml(t.spec, "PC\\me") and "<LogonTrigger>" in xml.read_text()
    )
    assert tools() == [
        ["schtasks", "/Query", "/TN", "llama-orch"],
        ["schtasks", "/Create", "/TN", "llama-orch", "/XML", str(xml)],
        ["schtasks", "/Run", "/TN", "llama-orch"],
    ]
    assert manage.status(home, manager="schtasks", name="llama-orch", user=True, host=host)[
        "installed"
    ]
    n = len(tools())
    _, plan = manage.uninstall(
        home, manager="schtasks", name="llama-orch", user=True, dry_run=False, host=host
    )
    carry_out(plan, host)
    assert tools()[n + 1 :] == [
        ["schtasks", "/End", "/TN", "llama-orch"],
        ["schtasks", "/Delete", "/TN", "llama-orch", "/F"],
    ]
    assert not xml.exists()


def test_dry_run_changes_nothing(home, tiny_model, tmp_path):
    write_config(home, "a", tiny_model)

    def snapshot() -> list[tuple[str, float]]:
        return sorted((str(p), p.stat().st_mtime) for p in home.root.rglob("*"))

    before = snapshot()
    for manager in ("systemd", "nssm", "schtasks"):
        for user in [False, True] if manager != "nssm" else [False]:
            args = ["service", "install", "--dry-run", "--manager", manager] + (
                ["--user"] if user else []
            )
            r = run_cli(home, *args, env={"XDG_CONFIG_HOME": str(tmp_path / "cfg")})
            assert r.returncode == 0, r.stderr
            assert "Would run:" in r.stdout
    assert snapshot() == before and not (tmp_path / "cfg").exists()
    assert not Path("/etc/systemd/system/llama-orch.service").exists()
    r = run_cli(home, "service", "uninstall", "--dry-run")
    assert r.returncode == 0 and "Would run: systemctl disable --now llama-orch.service" in r.stdout


def test_cli_errors_are_one_sentence_and_exit_2(home):
    for args, needle in [
        (["service", "install", "--manager", "launchd"], "Unknown service manager 'launchd'"),
        (["service", "install", "--name", "../x"], "not a valid service name"),
        (["service", "install", "--manager", "nssm", "--user"], "no per-user mode"),
    ]:
        r = run_cli(home, *args)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("user", [False, True])
def test_the_unit_passes_systemd_analyze_verify(home, tmp_path, user):
    import getpass

    spec = sp.Spec(
        "llama-orch",
        str(home.root),
        sys.executable,
        user=user,
        run_as=None if user else getpass.getuser(),
    )
    unit = tmp_path / "llama-orch.service"
    unit.write_text(sp.systemd_unit(spec))
    runtime = tmp_path / "run"  # a user manager needs a runtime folder
    runtime.mkdir(mode=0o700)
    r = subprocess.run(
        ["systemd-analyze", "verify", *(["--user"] if user else []), str(unit)],
        capture_output=True,
        text=True,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
    )
    problems = [ln for ln in r.stderr.splitlines() if "llama-orch.service" in ln]
    assert r.returncode == 0 and not problems, r.stderr


def test_exec_start_runs_the_daemon_which_starts_autostart_and_stops_all_on_sigterm(
    home, tiny_model, server_bin
):
    write_config(home, "boot", tiny_model, autostart=True)
    unit = sp.systemd_unit(sp.Spec("llama-orch", str(home.root), sys.executable))
    exec_start = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    proc = subprocess.Popen(
        shlex.split(exec_start.removeprefix("ExecStart=")),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(lambda: home.db_path.exists(), timeout=30)
        store = Store.open(home.db_path)
        row = wait_until(
            lambda: (r := store.get("boot")) and r.state == S.HEALTHY and r, timeout=60
        )
        pid = row.pid
        proc.send_signal(signal.SIGTERM)  # what `systemctl stop` does with KillMode=process
        assert proc.wait(60) == 0
        import psutil

        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
        assert store.get("boot").state == S.STOPPED
        kinds = [e.kind for e in store.events()]
        assert kinds.index("stopped") < kinds.index("daemon_stopped")  # instances first
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
