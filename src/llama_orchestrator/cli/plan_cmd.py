"""plan run | status | list | cancel | retry."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from llama_orchestrator.cli.context import app_context, print_json, say
from llama_orchestrator.present import (
    PLAN_RUN_COLUMNS,
    PLAN_TASK_COLUMNS,
    columns,
    plan_cancelled,
    plan_requeued,
    plan_run_cells,
    plan_summary,
    plan_task_cells,
    plan_waits,
)

__all__ = ["app"]

app = typer.Typer(
    help="Plans: DAGs of llm and shell tasks run on healthy instances.", no_args_is_help=True
)


def _follow(app_ctx: Any, run_id: str) -> int:
    """Live progress until the run ends; the exit code (0: every task completed)."""
    from llama_orchestrator.plans.ops import follow

    store = app_ctx.engine.store
    live_view = sys.stdout.isatty()
    if live_view:
        from rich.live import Live
        from rich.text import Text

        with Live(Text("waiting for the daemon..."), refresh_per_second=8) as live:

            def show(v: Any) -> None:
                data = v.to_json()
                live.update(Text(plan_summary(data) + "\n" + _task_table(data)))

            final = follow(store, run_id, show)
    else:
        seen: dict[str, tuple[str, int]] = {}

        def show(v: Any) -> None:
            for t in v.to_json()["tasks"]:
                key = (t["state"], t["attempts"])
                if seen.get(t["id"]) != key:
                    seen[t["id"]] = key
                    extra = (
                        f" ({t['error'][-120:]})"
                        if t["error"] and t["state"] != "completed"
                        else ""
                    )
                    say(f"{t['id']}: {t['state']} (attempt {t['attempts']}){extra}")

        final = follow(store, run_id, show)
    data = final.to_json()
    if not live_view:  # the live table already ends with it
        say(plan_summary(data))
    if data["state"] != "completed":
        say(
            f"`llama-orch plan status {run_id}` shows each task; results in "
            f"{app_ctx.home.plan_run_dir(run_id)}",
            to_err=True,
        )
    return 0 if data["state"] == "completed" else 1


def _control(app_ctx: Any) -> Any:
    """The home's daemon (plans run there), started in the background if none runs."""
    return app_ctx.control(start_daemon=True, says="Started the llama-orch daemon (pid {pid}).")


@app.command()
def run(
    ctx: typer.Context,
    file: Path = typer.Argument(..., metavar="FILE", help="The plan (JSON)."),
    var: list[str] = typer.Option([], "--var", help="KEY=VALUE for {{vars.KEY}}; repeatable."),
    wait: bool = typer.Option(
        False, "--wait", help="Follow it; exit 0 only if every task completed."
    ),
) -> None:
    """Check a plan, hand it to the daemon and print its run id."""
    from llama_orchestrator.plans.ops import check_file
    from llama_orchestrator.plans.spec import parse_vars

    app_ctx = app_context(ctx)
    given = parse_vars(var)
    plan, text = check_file(app_ctx.home, file, given)  # every problem before anything runs
    reply = _control(app_ctx).submit_plan(file, text, given)
    run_id, unserved = reply.id, reply.unserved
    say(run_id)
    if unserved:
        say(
            f"warning: no healthy instance serves {', '.join(unserved)} right now; those tasks "
            "wait until one does (`llama-orch up NAME`, `llama-orch ps`).",
            to_err=True,
        )
    say(
        f"plan run {run_id}: {len(plan.tasks)} tasks; `llama-orch plan status {run_id}`",
        to_err=True,
    )
    if wait:
        try:
            raise typer.Exit(_follow(app_ctx, run_id))
        except KeyboardInterrupt:
            say(
                f"\nThe plan keeps running; `llama-orch plan status {run_id}` follows it.",
                to_err=True,
            )
            raise typer.Exit(130) from None


@app.command()
def status(
    ctx: typer.Context,
    run_id: str = typer.Argument(..., metavar="ID", help="A run id (`plan list`)."),
    task: Optional[str] = typer.Argument(
        None, metavar="TASK", help="Print this task's output instead."
    ),
    json_: bool = typer.Option(False, "--json", help="JSON output."),
) -> None:
    """Every task of a run (state, attempts, instance, elapsed, error), or one task's output."""
    from llama_orchestrator.plans.records import RunFiles, require_run, require_task

    app_ctx = app_context(ctx)
    view = require_run(app_ctx.engine.store, run_id)
    if task is not None:
        entry = require_task(view, task)
        output, stderr = RunFiles(app_ctx.home.plan_run_dir(run_id)).task_output(task)
        if json_:
            print_json({**entry, "output": output, "stderr": stderr})
            return
        _task_output(entry, output, stderr)
        return
    data = view.to_json()
    if json_:
        print_json(data)
        return
    say(plan_summary(data))
    say(_task_table(data))
    for line in plan_waits(data):
        say(line)


def _task_table(data: dict[str, Any]) -> str:
    return columns(list(PLAN_TASK_COLUMNS), [plan_task_cells(t) for t in data["tasks"]])


def _task_output(entry: dict[str, Any], output: str | None, stderr: str | None) -> None:
    """The output to stdout (a shell task's stderr to stderr), what it is to stderr."""
    where = f" on {entry['instance']}" if entry["instance"] else ""
    say(f"task {entry['id']} ({entry['kind']}): {entry['state']}{where}", to_err=True)
    if entry["error"]:
        say(f"error: {entry['error']}", to_err=True)
    if not output and not stderr:
        ended = entry["state"] in ("completed", "failed", "skipped", "cancelled")
        say("(no output)" if ended else "(no output yet)", to_err=True)
    for text, to_err in ((output, False), (stderr, True)):
        if text:
            (sys.stderr if to_err else sys.stdout).write(
                text if text.endswith("\n") else text + "\n"
            )


@app.command("list")
def list_(
    ctx: typer.Context, json_: bool = typer.Option(False, "--json", help="JSON output.")
) -> None:
    """Plan runs, newest first."""
    from llama_orchestrator.plans.records import list_runs

    runs = [v.to_json() for v in list_runs(app_context(ctx).engine.store)]
    if json_:
        print_json([{k: v for k, v in r.items() if k != "tasks"} for r in runs])
        return
    if not runs:
        say("No plan runs yet; `llama-orch plan run FILE` starts one.")
        return
    say(columns(list(PLAN_RUN_COLUMNS), [plan_run_cells(r) for r in runs]))


@app.command()
def cancel(
    ctx: typer.Context, run_id: str = typer.Argument(..., metavar="ID", help="A run id.")
) -> None:
    """Cancel a run: running tasks are stopped (requests aborted, processes killed)."""
    from llama_orchestrator.plans.records import require_run

    app_ctx = app_context(ctx)
    require_run(app_ctx.engine.store, run_id)  # an unknown id is an error before any daemon starts
    stopped = _control(app_ctx).cancel_plan(run_id).cancelled
    say(plan_cancelled(run_id, stopped))


@app.command()
def retry(
    ctx: typer.Context,
    run_id: str = typer.Argument(..., metavar="ID", help="A run id."),
    wait: bool = typer.Option(
        False, "--wait", help="Follow it; exit 0 only if every task completed."
    ),
) -> None:
    """Run a finished run's failed, skipped and cancelled tasks again (completed ones stay)."""
    from llama_orchestrator.plans.records import require_run

    app_ctx = app_context(ctx)
    require_run(app_ctx.engine.store, run_id)
    again = _control(app_ctx).retry_plan(run_id).requeued
    say(plan_requeued(run_id, again))
    if wait:
        raise typer.Exit(_follow(app_ctx, run_id))
