"""The README and the docs site say what the program does: the site builds
with every link and anchor alive, every `llama-orch` command they show
exists, and every example request carries a token limit."""

import os
import re
import subprocess
import sys
from pathlib import Path

import click
import typer.main

from llama_orchestrator.cli.app import app

ROOT = Path(__file__).parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_docs_site_builds_with_no_dead_link(tmp_path):
    # no -q: mkdocs counts the warnings that --strict fails on through its log
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "site" / "gpu-builds" / "index.html").is_file()


def test_every_docs_page_is_in_the_sites_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {p.name for p in PAGES if p.parent.name == "docs"}
    assert {p for p in pages if f" {p}" not in nav} == set()


def _commands() -> set[str]:
    """Every command path: `up`, `plan run`, `config validate` ..."""
    root = typer.main.get_command(app)
    out: set[str] = set()

    def walk(cmd: click.Command, prefix: str) -> None:
        for name, sub in getattr(cmd, "commands", {}).items():
            out.add(f"{prefix}{name}")
            walk(sub, f"{prefix}{name} ")

    walk(root, "")
    return out | {"system remote"}  # the far end of --host: cli.app.main runs it itself


_INVOCATION = re.compile(r"llama-orch((?: [a-z][a-z-]*){1,2})")
_CODE = re.compile(r"```.*?```|`[^`\n]+`", re.DOTALL)


def _code(text: str) -> str:
    """The fenced blocks and inline code of a page (prose says "llama-orch looks")."""
    return "\n".join(_CODE.findall(text))


def test_every_llama_orch_command_the_docs_show_exists():
    known = _commands()
    groups = {c.split()[0] for c in known if " " in c}
    wrong = []
    for page in PAGES:
        for m in _INVOCATION.finditer(_code(page.read_text())):
            words = m.group(1).split()
            if words[0] not in known:
                wrong.append(f"{page.name}: llama-orch {words[0]}")
            elif words[0] in groups and len(words) > 1 and " ".join(words[:2]) not in known:
                wrong.append(f"{page.name}: llama-orch {' '.join(words[:2])}")
    assert wrong == []


def test_the_command_check_sees_a_renamed_command():
    known = _commands()
    assert "up" in known and "plan run" in known and "config validate" in known
    assert "start" not in known and "plan go" not in known


_REQUEST = re.compile(r"-d '(\{.*?\})'", re.DOTALL)


def test_every_example_request_carries_a_token_limit():
    unbounded = []
    for page in PAGES:
        for body in _REQUEST.findall(page.read_text()):
            asks = '"messages"' in body or '"prompt"' in body
            if asks and not re.search(r'"(max_tokens|n_predict|max_completion_tokens)"', body):
                unbounded.append(f"{page.name}: {body[:60]}")
    assert unbounded == []
