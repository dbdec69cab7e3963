"""What a service install writes and runs, for each manager: pure functions
from a `Spec` to files and command lines (golden-tested; `manage` does the I/O).

Every manager runs the same command, the daemon in the foreground with
`--stop-instances`: the manager's stop (SIGTERM, Ctrl+C) stops the instances
gracefully and then the daemon, while a crash of the daemon leaves them
running for the restarted daemon to adopt (systemd: KillMode=process; NSSM:
AppKillProcessTree 0).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from xml.sax.saxutils import escape

__all__ = [
    "Spec",
    "Plan",
    "Step",
    "Write",
    "Remove",
    "Run",
    "daemon_argv",
    "systemd_unit",
    "systemd_install",
    "systemd_uninstall",
    "nssm_install",
    "nssm_uninstall",
    "schtasks_xml",
    "schtasks_install",
    "schtasks_uninstall",
    "NSSM_URL",
    "systemctl_argv",
]

NSSM_URL = "https://nssm.cc/download"
DEFAULT_NAME = "llama-orch"


@dataclass(frozen=True)
class Spec:
    name: str  # the unit / service / task name
    home: str  # absolute
    python: str  # absolute interpreter
    user: bool = False  # per-user (systemd --user, a logon task) rather than system-wide
    run_as: str | None = None  # system installs: the account the daemon runs as
    group: str | None = None
    stop_grace: float = (
        90.0  # seconds the manager waits for a stop (instances' stop_timeout + margin)
    )
    log_max_bytes: int = 10 * 1024 * 1024


@dataclass(frozen=True)
class Write:
    path: str
    text: str


@dataclass(frozen=True)
class Remove:
    path: str


@dataclass(frozen=True)
class Run:
    argv: list[str]


Step = Write | Remove | Run


@dataclass
class Plan:
    """Steps carried out in order (or printed, with --dry-run), then notes."""

    steps: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def commands(self) -> list[list[str]]:
        return [s.argv for s in self.steps if isinstance(s, Run)]


def daemon_argv(spec: Spec) -> list[str]:
    return [
        spec.python,
        "-m",
        "llama_orchestrator",
        "--home",
        spec.home,
        "daemon",
        "start",
        "--foreground",
        "--stop-instances",
    ]


# --- systemd -------------------------------------------------------------------


def _systemd_word(arg: str) -> str:
    """One ExecStart word: quoted when needed; % and $ escaped (systemd expands them)."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if re.search(r'[\s"\'\\;]', arg) or not arg:
        return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return arg


def systemd_unit(spec: Spec) -> str:
    run_as = ""
    if not spec.user and spec.run_as:
        run_as = f"User={spec.run_as}\n" + (f"Group={spec.group}\n" if spec.group else "")
    wanted = "default.target" if spec.user else "multi-user.target"
    exec_start = " ".join(_systemd_word(a) for a in daemon_argv(spec))
    return f"""[Unit]
Description=llama-orch supervisor for {spec.home}
After=network.target
# give up after 5 failed starts within 5 minutes (see `service status`)
StartLimitIntervalSec=300
StartLimitBurst=5

[Service]
Type=simple
{run_as}WorkingDirectory={_systemd_word(spec.home)}
Environment=PYTHONUNBUFFERED=1
ExecStart={exec_start}
Restart=on-failure
RestartSec=2
# the router's client connections (router.max_connections) are capped by it
LimitNOFILE=65536
# A stop sends SIGTERM to the daemon alone, which stops the instances
# gracefully and then exits; a crash of the daemon leaves the instances
# running, and the restarted daemon adopts them.
KillMode=process
KillSignal=SIGTERM
TimeoutStopSec={spec.stop_grace:g}
SyslogIdentifier={spec.name}

[Install]
WantedBy={wanted}
"""


def systemctl_argv(spec: Spec, *args: str) -> list[str]:
    return ["systemctl", *(["--user"] if spec.user else []), *args]


def systemd_install(spec: Spec, unit_path: str) -> Plan:
    plan = Plan(
        [
            Write(unit_path, systemd_unit(spec)),
            Run(systemctl_argv(spec, "daemon-reload")),
            Run(systemctl_argv(spec, "enable", "--now", f"{spec.name}.service")),
        ]
    )
    if spec.user:
        plan.notes.append(
            "A user service runs while you are logged in; to start it at boot, run "
            "`loginctl enable-linger $USER` once."
        )
    plan.notes.append(
        f"Logs: `journalctl {'--user ' if spec.user else ''}-u {spec.name}` and "
        f"{spec.home}/logs/daemon.log."
    )
    return plan


def systemd_uninstall(spec: Spec, unit_path: str) -> Plan:
    return Plan(
        [
            Run(systemctl_argv(spec, "disable", "--now", f"{spec.name}.service")),
            Remove(unit_path),
            Run(systemctl_argv(spec, "daemon-reload")),
        ]
    )


# --- NSSM ----------------------------------------------------------------------


def nssm_install(spec: Spec) -> Plan:
    argv = daemon_argv(spec)
    logs = PureWindowsPath(spec.home) / "logs"
    grace_ms = str(int(spec.stop_grace * 1000))
    n = spec.name

    def nset(*args: str) -> Run:
        return Run(["nssm", "set", n, *args])

    return Plan(
        [
            Run(["nssm", "install", n, argv[0]]),
            nset("AppParameters", subprocess.list2cmdline(argv[1:])),
            nset("AppDirectory", spec.home),
            nset("DisplayName", f"llama-orch ({spec.home})"),
            nset("Description", f"llama-orch supervisor for {spec.home}"),
            nset("Start", "SERVICE_AUTO_START"),
            nset("AppStdout", str(logs / "service.out.log")),
            nset("AppStderr", str(logs / "service.err.log")),
            nset("AppRotateFiles", "1"),
            nset("AppRotateOnline", "1"),
            nset("AppRotateBytes", str(spec.log_max_bytes)),
            nset("AppExit", "Default", "Restart"),
            nset("AppRestartDelay", "2000"),
            # stop: Ctrl+C to the daemon's console (it stops the instances), and
            # only the daemon itself is killed if it does not exit in time
            nset("AppStopMethodSkip", "0"),
            nset("AppStopMethodConsole", grace_ms),
            nset("AppStopMethodWindow", "5000"),
            nset("AppStopMethodThreads", "5000"),
            nset("AppKillProcessTree", "0"),
            Run(["nssm", "start", n]),
        ],
        notes=[f"Logs: {logs / 'service.err.log'} and {logs / 'daemon.log'}."],
    )


def nssm_uninstall(spec: Spec) -> Plan:
    return Plan([Run(["nssm", "stop", spec.name]), Run(["nssm", "remove", spec.name, "confirm"])])


# --- Task Scheduler ---------------------------------------------------------------


def schtasks_xml(spec: Spec, account: str) -> str:
    """A Task Scheduler 1.2 definition: at logon (`user`) or at startup as
    SYSTEM, restarted on failure, no run-time limit, one instance at a time."""
    argv = daemon_argv(spec)
    if spec.user:
        trigger = f"<LogonTrigger><Enabled>true</Enabled><UserId>{escape(account)}</UserId></LogonTrigger>"
        principal = f"<UserId>{escape(account)}</UserId><LogonType>InteractiveToken</LogonType>"
    else:
        trigger = "<BootTrigger><Enabled>true</Enabled></BootTrigger>"
        principal = "<UserId>S-1-5-18</UserId><RunLevel>HighestAvailable</RunLevel>"
    args = subprocess.list2cmdline(argv[1:])  # Windows' quoting rules
    return f"""<?xml version="1.0" encoding="UTF-16"?>
<Task version="1.2" xmlns="http://schemas.microsoft.com/windows/2004/02/mit/task">
  <RegistrationInfo>
    <Description>llama-orch supervisor for {escape(spec.home)}</Description>
  </RegistrationInfo>
  <Triggers>
    {trigger}
  </Triggers>
  <Principals>
    <Principal id="Author">
      {principal}
    </Principal>
  </Principals>
  <Settings>
    <MultipleInstancesPolicy>IgnoreNew</MultipleInstancesPolicy>
    <DisallowStartIfOnBatteries>false</DisallowStartIfOnBatteries>
    <StopIfGoingOnBatteries>false</StopIfGoingOnBatteries>
    <StartWhenAvailable>true</StartWhenAvailable>
    <ExecutionTimeLimit>PT0S</ExecutionTimeLimit>
    <RestartOnFailure>
      <Interval>PT1M</Interval>
      <Count>999</Count>
    </RestartOnFailure>
    <Enabled>true</Enabled>
  </Settings>
  <Actions Context="Author">
    <Exec>
      <Command>{escape(argv[0])}</Command>
      <Arguments>{escape(args)}</Arguments>
      <WorkingDirectory>{escape(spec.home)}</WorkingDirectory>
    </Exec>
  </Actions>
</Task>
"""


def schtasks_install(spec: Spec, xml_path: str, account: str, replace: bool) -> Plan:
    create = ["schtasks", "/Create", "/TN", spec.name, "/XML", xml_path]
    return Plan(
        [
            Write(xml_path, schtasks_xml(spec, account)),
            Run(create + (["/F"] if replace else [])),
            Run(["schtasks", "/Run", "/TN", spec.name]),
        ],
        notes=[
            "The task starts "
            + ("when you log on." if spec.user else "at boot, as SYSTEM.")
            + f" Logs: {PureWindowsPath(spec.home) / 'logs' / 'daemon.log'}."
        ],
    )


def schtasks_uninstall(spec: Spec) -> Plan:
    return Plan(
        [
            Run(["schtasks", "/End", "/TN", spec.name]),
            Run(["schtasks", "/Delete", "/TN", spec.name, "/F"]),
        ]
    )


def default_unit_dir(user: bool, config_home: Path) -> Path:
    return config_home / "systemd" / "user" if user else Path("/etc/systemd/system")
