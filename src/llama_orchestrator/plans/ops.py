"""What the `plan` commands do, behind the Typer layer: read and check a plan
file, follow a run. Handing it to the daemon is the client's
(`daemon.client.submit_plan`)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llama_orchestrator.config.validate import model_names
from llama_orchestrator.errors import UserError
from llama_orchestrator.home import Home
from llama_orchestrator.plans.records import RunFiles, RunView, named_run, require_run
from llama_orchestrator.plans.spec import Plan, parse_plan
from llama_orchestrator.store.database import Store

__all__ = ["check_file", "follow", "for_peer"]


def check_file(home: Home, path: Path, given_vars: dict[str, str]) -> tuple[Plan, str]:
    """The plan checked as the daemon will check it, and its text (`-`: read
    from stdin, e.g. a local file sent to another machine's `--host`)."""
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(
            f"No plan file {path}.",
            hint="Give the path of a plan's JSON file (with --host, a path on that machine; "
            "`plan run - < plan.json` sends one from here).",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"Cannot read the plan file {path}: {exc}.") from None
    from llama_orchestrator.config.parse import load_settings

    peers = load_settings(home.settings_path).peers
    plan = parse_plan(
        text,
        str(path),
        # with peers, the daemon checks the models: it knows what theirs offer
        known_models=None if peers else model_names(home),
        given_vars=given_vars,
        base_dir=path.parent,
        hosts={p.name for p in peers if p.ssh},
    )
    return plan, text


def follow(
    store: Store,
    run_id: str,
    on_change: Callable[[RunView], Any],
    interval: float = 0.2,
) -> RunView:
    """Poll the run until it finishes, calling on_change with each new view."""
    last: Any = None
    while True:
        current = require_run(store, run_id)
        key = (current.state, [(r.state, r.attempts) for r in current.records.values()])
        if key != last:
            on_change(current)
            last = key
        if current.state != "running":
            return current
        time.sleep(interval)


def for_peer(
    home: Home,
    store: Store,
    submit: Callable[[Path, str], str],
    text: str,
    origin: str,
    started: Callable[[str], None],
) -> dict[str, Any]:
    """A task another machine's plan runs here (`system task`): a one-task
    plan named `origin` (that plan's run and task). A run of that name that
    is still going, or that completed, is followed again rather than started
    anew (the other machine's daemon was restarted meanwhile); else `submit`
    starts one. `started(run_id)` is told before it is followed to its end."""
    run_id = named_run(store, origin, ("running", "completed")) or submit(
        home.root / "from-peers.json", text
    )
    started(run_id)
    view = follow(store, run_id, lambda _: None)
    (record,) = view.records.values()
    output, stderr = RunFiles(home.plan_run_dir(run_id)).task_output(record.id)
    return {
        "run": run_id,
        "state": record.state,
        "error": record.error,
        "output": output or "",
        "stderr": stderr or "",
    }
