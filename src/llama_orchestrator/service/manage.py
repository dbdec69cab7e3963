"""service install | uninstall | status: checks, then the plan from `spec`
carried out (or printed with --dry-run). Facts about the machine come in a
`Host`, so tests run every branch with fake managers on PATH."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_orchestrator.config.parse import load_settings
from llama_orchestrator.config.validate import load_all
from llama_orchestrator.errors import OrchError, UserError
from llama_orchestrator.files import atomic_write_text
from llama_orchestrator.home import Home
from llama_orchestrator.service import spec as sp

__all__ = ["Host", "MANAGERS", "install", "uninstall", "status", "execute", "describe_plan"]

MANAGERS = ("systemd", "nssm", "schtasks")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass(frozen=True)
class Host:
    windows: bool
    root: bool
    systemd_running: bool
    config_home: Path  # $XDG_CONFIG_HOME or ~/.config
    account: str  # who runs the command (the sudo caller under sudo)
    group: str | None
    system_unit_dir: Path = Path("/etc/systemd/system")
    which: Callable[[str], str | None] = shutil.which

    @classmethod
    def detect(cls) -> Host:
        import getpass

        windows = os.name == "nt"
        account = os.environ.get("SUDO_USER") or getpass.getuser()
        group = None
        if not windows:
            import grp
            import pwd

            try:
                group = grp.getgrgid(pwd.getpwnam(account).pw_gid).gr_name
            except KeyError:
                group = None
        elif os.environ.get("USERDOMAIN"):
            account = f"{os.environ['USERDOMAIN']}\\{account}"
        config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        return cls(
            windows=windows,
            root=not windows and os.geteuid() == 0,
            systemd_running=Path("/run/systemd/system").is_dir(),
            config_home=config_home,
            account=account,
            group=group,
        )


@dataclass(frozen=True)
class Target:
    manager: str
    spec: sp.Spec
    path: str | None  # the unit file or task XML, where there is one


def _target(home: Home, manager: str | None, name: str, user: bool, host: Host) -> Target:
    manager = manager or ("nssm" if host.windows else "systemd")
    if manager not in MANAGERS:
        raise UserError(
            f"Unknown service manager '{manager}'.", hint=f"Use one of {', '.join(MANAGERS)}."
        )
    if not _NAME.match(name):
        raise UserError(
            f"'{name}' is not a valid service name.",
            hint="Use letters, digits, '.', '_' or '-' (at most 63).",
        )
    if manager == "nssm" and user:
        raise UserError(
            "NSSM installs system services; it has no per-user mode.",
            hint="Use `--manager schtasks --user` for a task that starts when you log on.",
        )
    configs = [x.config for x in load_all(home) if x.config is not None]
    grace = max([90.0] + [c.stop_timeout + 30 for c in configs])
    spec = sp.Spec(
        name=name,
        home=str(home.root),
        python=sys.executable,
        user=user,
        run_as=None if user else host.account,
        group=None if user else host.group,
        stop_grace=grace,
        log_max_bytes=load_settings(home.settings_path).logs.max_bytes,
    )
    path = None
    if manager == "systemd":
        unit_dir = host.config_home / "systemd" / "user" if user else host.system_unit_dir
        path = str(unit_dir / f"{name}.service")
    elif manager == "schtasks":
        path = str(home.state_dir / f"{name}.task.xml")
    return Target(manager, spec, path)


def _installed(t: Target, host: Host) -> bool:
    if t.manager == "systemd":
        return t.path is not None and Path(t.path).exists()
    tool = "nssm" if t.manager == "nssm" else "schtasks"
    if host.which(tool) is None:
        return False
    argv = (
        ["nssm", "status", t.spec.name]
        if tool == "nssm"
        else ["schtasks", "/Query", "/TN", t.spec.name]
    )
    return _call(argv, host).returncode == 0


def _call(argv: list[str], host: Host) -> subprocess.CompletedProcess[str]:
    exe = host.which(argv[0]) or argv[0]
    try:
        return subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=120)
    except OSError as exc:
        raise OrchError(f"`{argv[0]}` could not be run: {exc}.") from exc


def _check_tools(t: Target, plan: sp.Plan, host: Host) -> None:
    if t.manager == "systemd":
        if host.which("systemctl") is None or not host.systemd_running:
            raise UserError(
                "systemd is not running on this machine (a container, or another init system), "
                "so a unit cannot be enabled here.",
                hint="Run `llama-orch daemon start --foreground --stop-instances` under the "
                "supervisor you have, or see the unit with --dry-run.",
            )
        if not t.spec.user and not host.root:
            raise UserError(
                "Installing a system service needs root.",
                hint="Run it with sudo, or use --user for a service of your own.",
            )
        return
    tool = "nssm" if t.manager == "nssm" else "schtasks"
    if host.which(tool) is None:
        if tool == "nssm":
            commands = "\n".join("  " + subprocess.list2cmdline(c) for c in plan.commands)
            raise UserError(
                f"nssm is not on PATH. Get it from {sp.NSSM_URL}, put nssm.exe on PATH and run "
                f"this again, or run these commands yourself:\n{commands}"
            )
        raise UserError(
            "schtasks (Windows' Task Scheduler) is not available on this machine.",
            hint="Use --manager systemd on Linux.",
        )


def _stop_background_daemon(home: Home) -> list[sp.Step]:
    """A daemon `up` started would keep the service's daemon from taking the
    home's lock: stop it first (instances keep running; the service adopts them)."""
    from llama_orchestrator.home import daemon_lock_held

    if not daemon_lock_held(home):
        return []
    return [
        sp.Run(
            [sys.executable, "-m", "llama_orchestrator", "--home", str(home.root), "daemon", "stop"]
        )
    ]


def install(
    home: Home,
    *,
    manager: str | None,
    name: str,
    user: bool,
    force: bool,
    dry_run: bool,
    host: Host,
) -> tuple[Target, sp.Plan]:
    t = _target(home, manager, name, user, host)
    if t.manager == "systemd":
        plan = sp.systemd_install(t.spec, t.path or "")
    elif t.manager == "nssm":
        plan = sp.nssm_install(t.spec)
    else:
        plan = sp.schtasks_install(t.spec, t.path or "", host.account, replace=force)
    if dry_run:
        return t, plan
    _check_tools(t, plan, host)
    if _installed(t, host):
        if not force:
            where = t.path if t.manager == "systemd" else f"{t.manager} service {name}"
            raise UserError(
                f"The service '{name}' is already installed ({where}).",
                hint="Use --force to replace it, or `llama-orch service uninstall` first.",
            )
        if t.manager == "nssm":
            plan.steps[:0] = sp.nssm_uninstall(t.spec).steps
    plan.steps[:0] = _stop_background_daemon(home)
    return t, plan


def uninstall(
    home: Home, *, manager: str | None, name: str, user: bool, dry_run: bool, host: Host
) -> tuple[Target, sp.Plan]:
    t = _target(home, manager, name, user, host)
    if t.manager == "systemd":
        plan = sp.systemd_uninstall(t.spec, t.path or "")
    elif t.manager == "nssm":
        plan = sp.nssm_uninstall(t.spec)
    else:
        plan = sp.schtasks_uninstall(t.spec)
        if t.path:
            plan.steps.append(sp.Remove(t.path))
    if dry_run:
        return t, plan
    _check_tools(t, plan, host)
    if not _installed(t, host):
        raise UserError(
            f"No service '{name}' is installed with {t.manager}"
            + (f" ({t.path} does not exist)." if t.manager == "systemd" else "."),
            hint="`llama-orch service status` shows what is installed.",
        )
    return t, plan


def execute(plan: sp.Plan, host: Host, on_step: Callable[[str], None]) -> None:
    """Carry the plan out in order; stop at the first command that fails."""
    for step in plan.steps:
        if isinstance(step, sp.Write):
            atomic_write_text(Path(step.path), step.text)
            on_step(f"Wrote {step.path}")
        elif isinstance(step, sp.Remove):
            Path(step.path).unlink(missing_ok=True)
            on_step(f"Removed {step.path}")
        else:
            r = _call(step.argv, host)
            shown = subprocess.list2cmdline(step.argv)
            if r.returncode != 0:
                detail = (r.stderr or r.stdout).strip().splitlines()
                raise OrchError(
                    f"`{shown}` failed (exit {r.returncode})"
                    + (f": {detail[-1]}" if detail else "."),
                    hint="Fix that and run the command again; --force replaces a half-done install.",
                )
            on_step(f"Ran {shown}")


def describe_plan(plan: sp.Plan) -> list[str]:
    """What --dry-run prints: every file with its content, every command."""
    out = []
    for step in plan.steps:
        if isinstance(step, sp.Write):
            out.append(f"Would write {step.path}:")
            out += ["    " + line for line in step.text.splitlines()]
        elif isinstance(step, sp.Remove):
            out.append(f"Would remove {step.path}")
        else:
            out.append(f"Would run: {subprocess.list2cmdline(step.argv)}")
    return out


def status(home: Home, *, manager: str | None, name: str, user: bool, host: Host) -> dict[str, Any]:
    t = _target(home, manager, name, user, host)
    data: dict[str, Any] = {
        "manager": t.manager,
        "name": name,
        "path": t.path,
        "installed": False,
        "enabled": None,
        "active": None,
        "details": [],
    }
    if t.manager == "systemd":
        data["installed"] = bool(t.path and Path(t.path).exists())
        if host.which("systemctl") and host.systemd_running and data["installed"]:
            unit = f"{name}.service"
            data["enabled"] = _call(
                sp.systemctl_argv(t.spec, "is-enabled", unit), host
            ).stdout.strip()
            data["active"] = _call(
                sp.systemctl_argv(t.spec, "is-active", unit), host
            ).stdout.strip()
            shown = _call(
                sp.systemctl_argv(t.spec, "status", "--no-pager", "--lines", "5", unit), host
            )
            data["details"] = shown.stdout.splitlines()
        return data
    tool = "nssm" if t.manager == "nssm" else "schtasks"
    if host.which(tool) is None:
        data["details"] = [f"{tool} is not available on this machine"]
        return data
    if tool == "nssm":
        r = _call(["nssm", "status", name], host)
        data["installed"] = r.returncode == 0
        data["active"] = r.stdout.strip() or None
    else:
        r = _call(["schtasks", "/Query", "/TN", name, "/V", "/FO", "LIST"], host)
        data["installed"] = r.returncode == 0
    data["details"] = (r.stdout or r.stderr).splitlines()
    return data
