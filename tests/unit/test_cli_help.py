"""Every command's --help as a person reads it (issue 23, item 10)."""

import re

import typer.main
from typer.testing import CliRunner

from llama_orchestrator.cli.app import app


def command_paths(command, prefix=()):
    yield prefix
    for name, sub in sorted((getattr(command, "commands", None) or {}).items()):
        yield from command_paths(sub, (*prefix, name))


def test_help_shows_plain_names_and_no_type_placeholders(tmp_path):
    runner = CliRunner()
    paths = list(command_paths(typer.main.get_command(app)))
    assert ("plan", "status") in paths and ("logs",) in paths and len(paths) > 30
    for path in paths:
        # a home that is not there: help needs none
        r = runner.invoke(app, ["--home", str(tmp_path / "nowhere"), *path, "--help"])
        assert r.exit_code == 0, (path, r.output)
        usage = next(line for line in r.output.splitlines() if "Usage:" in line)
        assert "{" not in usage, (path, usage)
        for placeholder in ("<str>", "<int", "<float", "<path>", "<bool>"):
            assert placeholder not in r.output, (path, placeholder, r.output)
    r = runner.invoke(app, ["logs", "--help"])
    assert re.search(r"Usage: llama-orch logs \[OPTIONS\] NAME\s*$", r.output, re.M)
    assert re.search(r"--tail\s+-n\s+N\b", r.output)
    r = runner.invoke(app, ["up", "--help"])
    assert "Usage: llama-orch up [OPTIONS] [NAME]..." in r.output
    assert re.search(r"--timeout\s+SECONDS", r.output)
    assert not (tmp_path / "nowhere").exists()


def test_the_cli_loads_no_config_models_until_a_command_needs_them():
    """pydantic's models cost ~180 ms to import; every command pays what the
    CLI imports up front (a command module importing them eagerly once made
    each CLI call ~0.2 s slower)."""
    import subprocess
    import sys

    code = (
        "import sys, llama_orchestrator.cli.app; "
        "print([m for m in ('pydantic', 'llama_orchestrator.config', 'httpx', 'jsonschema') "
        "if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
