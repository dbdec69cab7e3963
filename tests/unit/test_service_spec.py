"""The files and command lines a service install produces, against golden
files (regenerate with UPDATE_GOLDEN=1 and review the diff)."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from llama_orchestrator.service import spec as sp

GOLDEN = Path(__file__).parent.parent / "golden"

LINUX = sp.Spec("llama-orch", "/srv/llm", "/opt/venv/bin/python", run_as="llm", group="llm")
WINDOWS = sp.Spec("llama-orch", "C:\\LLM Home", "C:\\Python311\\python.exe", stop_grace=120)


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{name} differs from its golden file"


def test_systemd_system_unit():
    golden("llama-orch.service", sp.systemd_unit(LINUX))


def test_systemd_user_unit_has_no_user_and_wants_default_target():
    text = sp.systemd_unit(sp.Spec("llama-orch", "/home/me/llm", "/usr/bin/python3", user=True))
    assert "User=" not in text and "WantedBy=default.target" in text
    golden("llama-orch.user.service", text)


def test_systemd_install_and_uninstall_commands():
    plan = sp.systemd_install(LINUX, "/etc/systemd/system/llama-orch.service")
    assert plan.steps[0] == sp.Write(
        "/etc/systemd/system/llama-orch.service", sp.systemd_unit(LINUX)
    )
    assert plan.commands == [
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", "--now", "llama-orch.service"],
    ]
    user = sp.Spec("x", "/h", "/p", user=True)
    assert sp.systemd_uninstall(user, "/u/x.service").steps == [
        sp.Run(["systemctl", "--user", "disable", "--now", "x.service"]),
        sp.Remove("/u/x.service"),
        sp.Run(["systemctl", "--user", "daemon-reload"]),
    ]
    assert any("loginctl enable-linger" in n for n in sp.systemd_install(user, "/u").notes)


def test_exec_start_survives_spaces_percent_and_dollar():
    spec = sp.Spec("x", "/srv/my llm/100%", "/opt/$py/bin/python")
    line = next(x for x in sp.systemd_unit(spec).splitlines() if x.startswith("ExecStart="))
    # systemd unescapes %% and $$; after that the words are shell-like
    words = shlex.split(line.removeprefix("ExecStart=").replace("%%", "%").replace("$$", "$"))
    assert words == sp.daemon_argv(spec)


def test_nssm_commands():
    lines = [subprocess.list2cmdline(c) for c in sp.nssm_install(WINDOWS).commands]
    golden("nssm-install.txt", "\n".join(lines) + "\n")
    assert sp.nssm_uninstall(WINDOWS).commands == [
        ["nssm", "stop", "llama-orch"],
        ["nssm", "remove", "llama-orch", "confirm"],
    ]


@pytest.mark.parametrize(("user", "name"), [(False, "task-boot.xml"), (True, "task-logon.xml")])
def test_task_scheduler_xml(user, name):
    spec = sp.Spec(WINDOWS.name, WINDOWS.home, WINDOWS.python, user=user)
    text = sp.schtasks_xml(spec, "PC\\me")
    golden(name, text)
    import xml.dom.minidom

    xml.dom.minidom.parseString(text.replace('encoding="UTF-16"', 'encoding="UTF-8"'))
