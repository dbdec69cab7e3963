"""Home resolution and the paths inside a home (DESIGN §1)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from llama_orchestrator.errors import UserError

__all__ = ["Home", "resolve_home", "find_home", "require_home", "NAME_RE", "check_name"]

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def check_name(name: str) -> str:
    """Return `name` if it is a valid instance name, else raise a UserError.

    The pattern keeps names safe as a folder, a unit name and a metric label,
    and rules out path traversal such as `../evil`.
    """
    if not NAME_RE.match(name) or name in {".", ".."} or ".." in name:
        raise UserError(
            f"'{name}' is not a valid instance name.",
            hint="Use 1-63 characters: lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit.",
        )
    return name


@dataclass(frozen=True)
class Home:
    """One installation: configs, state, logs and optional binary."""

    root: Path

    @property
    def instances_dir(self) -> Path:
        return self.root / "instances"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "state.sqlite"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def settings_path(self) -> Path:
        return self.root / "llama-orch.json"

    @property
    def bin_dir(self) -> Path:
        return self.root / "bin"

    # --- the daemon's files (see llama_orchestrator.daemon) ---

    @property
    def daemon_socket(self) -> Path:
        return self.state_dir / "daemon.sock"

    @property
    def daemon_lock(self) -> Path:
        return self.state_dir / "daemon.lock"

    @property
    def daemon_info(self) -> Path:
        """pid, address and token of the running daemon (JSON, mode 0600)."""
        return self.state_dir / "daemon.json"

    @property
    def daemon_log(self) -> Path:
        return self.logs_dir / "daemon.log"

    def instance_dir(self, name: str) -> Path:
        return self.instances_dir / check_name(name)

    def config_path(self, name: str) -> Path:
        return self.instance_dir(name) / "config.json"

    def log_dir(self, name: str) -> Path:
        return self.logs_dir / check_name(name)

    def plan_run_dir(self, run_id: str) -> Path:
        """A plan run's folder: plan.json, <task>.out, <task>.err, run.jsonl."""
        return self.root / "plans" / run_id

    def upstream_names(self) -> set[str]:
        """The instance folders whose config declares an upstream (an API:
        nothing of it runs here), read as plain JSON: `up NAME` needs no
        config schema (pydantic's import is ~100 ms of it)."""
        return {n for n in self.instance_names() if _declares_upstream_file(self.config_path(n))}

    def on_cluster(self) -> bool:
        """Whether llama-orch.json names a cluster (its instances run on Ray's
        nodes, which only the daemon reaches), read as plain JSON: `ps` needs
        no settings schema. A file that does not parse says no (the commands
        that read the settings say what is wrong with it)."""
        import json

        try:
            data = json.loads(self.settings_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and data.get("cluster") is not None

    def instance_names(self) -> list[str]:
        """Names of every instance folder that holds a config.json, sorted."""
        if not self.instances_dir.is_dir():
            return []
        return sorted(
            p.name
            for p in self.instances_dir.iterdir()
            if p.is_dir() and NAME_RE.match(p.name) and (p / "config.json").is_file()
        )


def resolve_home(explicit: str | os.PathLike[str] | None = None, cwd: Path | None = None) -> Home:
    """Find the home: --home, then $LLAMA_ORCH_HOME, then the nearest folder
    (from cwd upwards) that has `instances/`, then the per-user data folder."""
    return find_home(explicit, cwd)[0]


#: how a home was found (see find_home)
FROM_FLAG, FROM_ENV, FROM_CWD, PER_USER = "--home", "$LLAMA_ORCH_HOME", "found", "per-user"


def find_home(
    explicit: str | os.PathLike[str] | None = None, cwd: Path | None = None
) -> tuple[Home, str]:
    """The home and how it was found: FROM_FLAG, FROM_ENV, FROM_CWD or PER_USER."""
    if explicit:
        return Home(Path(explicit).expanduser().resolve()), FROM_FLAG
    env = os.environ.get("LLAMA_ORCH_HOME")
    if env:
        return Home(Path(env).expanduser().resolve()), FROM_ENV
    here = (cwd or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "instances").is_dir():
            return Home(folder), FROM_CWD
    import platformdirs  # lazily: only the last fallback needs it

    return Home(Path(platformdirs.user_data_dir("llama-orch", appauthor=False))), PER_USER


def require_home(explicit: str | os.PathLike[str], may_create: bool = False) -> None:
    """Refuse a home named by --home or $LLAMA_ORCH_HOME that is a file, or
    (unless `may_create`: init and demo make one) that does not exist."""
    path = Path(explicit).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(
            f"--home {path} is a file, not a folder.",
            hint="Point --home (or $LLAMA_ORCH_HOME) at a folder: the one that holds instances/.",
        )
    if not path.exists() and not may_create:
        raise UserError(
            f"No llama-orch home at {path}: the folder does not exist.",
            hint=f"Check --home (or $LLAMA_ORCH_HOME), or create one there with "
            f"`llama-orch --home {path} init NAME --model PATH`.",
        )


def daemon_lock_held(home: Home) -> bool:
    """True while some process (a daemon, or one starting) holds the home's
    daemon lock. The kernel drops the lock when its holder dies, even by
    SIGKILL, so the lock (not a pid file) says whether a daemon runs."""
    from llama_orchestrator import platform

    if not home.daemon_lock.exists():
        return False
    probe = platform.try_lock(home.daemon_lock)
    if probe is None:
        return True
    probe.close()
    return False


def is_upstream(data: object) -> bool:
    """A config's JSON that declares an upstream (an API), not a llama-server.
    Here, not in config: naming instances needs no config schema."""
    return isinstance(data, dict) and "upstream" in data


def declares_upstream(text: str) -> bool:
    """A config's text whose JSON is an upstream's (False when it is no JSON:
    the config's own parse says what is wrong)."""
    import json

    try:
        return is_upstream(json.loads(text))
    except ValueError:
        return False


def _declares_upstream_file(config: Path) -> bool:
    try:
        return declares_upstream(config.read_text(encoding="utf-8"))
    except OSError:
        return False
