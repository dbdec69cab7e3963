"""Named machines, as `docker context` keeps them: `contexts.json` in the
per-user config folder (platformdirs; `$XDG_CONFIG_HOME/llama-orch` on
Linux), written atomically. The context `default` is this machine and is
never stored.

Which machine a command runs on, first hit wins: `--host` → `$LLAMA_ORCH_HOST`
→ `$LLAMA_ORCH_CONTEXT` → the context `context use` chose → this machine.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llama_orchestrator.errors import UserError
from llama_orchestrator.files import atomic_write_text
from llama_orchestrator.home import NAME_RE
from llama_orchestrator.hosts.ssh import SshTarget, parse_target

__all__ = ["Context", "Contexts", "DEFAULT", "config_dir", "choose", "resolve"]

DEFAULT = "default"


@dataclass(frozen=True)
class Context:
    name: str
    host: str  # ssh://...
    remote_command: str = "llama-orch"
    description: str = ""

    def target(self) -> SshTarget:
        return parse_target(self.host, self.remote_command, self.name)


def config_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_config_dir("llama-orch", appauthor=False))


class Contexts:
    def __init__(self, folder: Path | None = None) -> None:
        self.path = (folder or config_dir()) / "contexts.json"

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"current": DEFAULT, "contexts": {}}
        except (OSError, ValueError) as exc:
            raise UserError(
                f"{self.path} cannot be read as JSON ({exc}); fix it or remove it "
                "(it only holds the contexts of `llama-orch context create`)."
            ) from None
        if not isinstance(data, dict) or not isinstance(data.get("contexts", {}), dict):
            raise UserError(f"{self.path} is not a contexts file; fix it or remove it.")
        return {"current": data.get("current", DEFAULT), "contexts": data.get("contexts", {})}

    def _write(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(data, indent=2) + "\n")

    def all(self) -> list[Context]:
        known = {f.name for f in Context.__dataclass_fields__.values()}
        return [
            Context(**{k: v for k, v in {**c, "name": n}.items() if k in known})
            for n, c in sorted(self._read()["contexts"].items())
        ]

    def current(self) -> str:
        return str(self._read()["current"])

    def get(self, name: str) -> Context | None:
        if name == DEFAULT:
            return None
        for c in self.all():
            if c.name == name:
                return c
        names = ", ".join([DEFAULT, *(c.name for c in self.all())])
        raise UserError(
            f"There is no context '{name}' (there are: {names}).",
            hint="Make it with `llama-orch context create NAME --host ssh://user@host`.",
        )

    def create(self, context: Context, force: bool = False) -> None:
        if not NAME_RE.match(context.name) or context.name == DEFAULT:
            raise UserError(
                f"'{context.name}' cannot name a context; use lowercase letters, digits, "
                "'.', '_' and '-' (and not 'default', which is this machine)."
            )
        context.target()  # a bad address is refused before anything is written
        data = self._read()
        if context.name in data["contexts"] and not force:
            raise UserError(f"The context '{context.name}' exists already; `--force` replaces it.")
        fields = asdict(context)
        del fields["name"]
        data["contexts"][context.name] = fields
        self._write(data)

    def use(self, name: str) -> None:
        self.get(name)
        data = self._read()
        data["current"] = name
        self._write(data)

    def remove(self, name: str) -> None:
        if self.get(name) is None:
            raise UserError("The context 'default' is this machine; it cannot be removed.")
        data = self._read()
        del data["contexts"][name]
        if data["current"] == name:
            data["current"] = DEFAULT
        self._write(data)


def choose(flag: str | None, env: dict[str, str] | None = None) -> SshTarget | None:
    """The machine a command runs on (None: this one), by the order above."""
    env = dict(os.environ) if env is None else env
    url = flag or env.get("LLAMA_ORCH_HOST") or None
    if url:
        return resolve(url)
    store = Contexts()
    name = env.get("LLAMA_ORCH_CONTEXT") or store.current()
    context = store.get(name)
    return context.target() if context else None


def resolve(url: str) -> SshTarget | None:
    """An ssh:// address, or a context's name (None: `default`, this machine)."""
    if not url.startswith("ssh://") and NAME_RE.match(url):
        context = Contexts().get(url)  # --host rig2: a context's name
        return context.target() if context else None
    return parse_target(url)
