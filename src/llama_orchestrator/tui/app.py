"""`llama-orch dashboard`: a live view of every instance, with actions.

The app is built around a DataSource passed to its constructor (STYLE 11):
snapshots are taken in a worker thread every `refresh` seconds and applied
on the UI thread; actions run in worker threads through the same core
functions the CLI uses.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.widgets import ContentSwitcher, DataTable, Footer, Input, Log, Static

from llama_orchestrator.engine.results import exit_text
from llama_orchestrator.plans import run_verbs
from llama_orchestrator.present import (
    GPU_COLUMNS,
    PLAN_RUN_COLUMNS,
    PLAN_STATE_STYLES,
    PLAN_TASK_COLUMNS,
    gpu_cells,
    on_demand_line,
    plan_run_cells,
    plan_task_cells,
)
from llama_orchestrator.tui.cells import (
    COLUMNS,
    HOST_COLUMNS,
    cells,
    fit_columns,
    host_cells,
    peer_detail,
    shown_columns,
    styled,
    sync_rows,
)
from llama_orchestrator.tui.data import DataSource, InstanceView, Snapshot, matches
from llama_orchestrator.tui.screens import (
    ConfirmScreen,
    HelpScreen,
    LogScreen,
    LogTail,
    TaskOutputScreen,
)
from llama_orchestrator.units import human_bytes

__all__ = ["DashboardApp", "MIN_WIDTH", "MIN_HEIGHT"]

MIN_WIDTH, MIN_HEIGHT = 70, 14


class DashboardApp(App[None]):
    TITLE = "llama-orch"
    # no command palette: its footer key took the room of `? Help` and `q Quit` at 80 columns
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    #status { height: 1; background: $boost; padding: 0 1; }
    #filter { display: none; height: 3; }
    #filter.visible { display: block; }
    #instances { height: 1fr; }
    #empty { height: 1fr; content-align: center middle; display: none; }
    #bottom { height: 45%; border-top: solid $primary; }
    #config { width: 44; padding: 0 1; }
    #logtail { border-left: solid $primary-darken-2; }
    #gpu-table { height: auto; max-height: 80%; }
    #gpu-warnings { padding: 1 1 0 1; }
    #plan-runs { width: auto; max-width: 50%; }
    #plan-tasks { width: 1fr; border-left: solid $primary-darken-2; }
    #plans-empty { padding: 1 2; }
    #task-output { border: solid $primary; }
    #too-small { display: none; width: 100%; height: 100%; content-align: center middle; }
    Screen.too-small #main { display: none; }
    Screen.too-small #too-small { display: block; }
    #dialog { width: 72; max-width: 100%; height: auto; padding: 1 2; border: thick $primary; background: $surface; }
    ConfirmScreen, HelpScreen { align: center middle; }
    """
    BINDINGS: ClassVar = [
        Binding("u", "up", "Up"),
        Binding("d", "down", "Down"),
        Binding("r", "restart", "Restart"),
        Binding("l", "logs", "Logs"),
        Binding("slash", "filter", "Filter"),
        Binding("e", "pane('events')", "Events"),
        Binding("g", "pane('gpus')", "GPUs"),
        Binding("p", "pane('plans')", "Plans"),
        Binding("o", "task_output", "Output"),
        Binding("c", "cancel_plan", "Cancel run"),
        Binding("t", "retry_plan", "Retry run"),
        Binding("s", "stream", "stdout/err", show=False),
        Binding("question_mark", "help", "Help"),
        Binding("q", "quit", "Quit"),
        Binding("escape", "clear_filter", show=False),
    ]

    def __init__(self, source: DataSource, refresh: float = 2.0) -> None:
        super().__init__()
        self.source = source
        self.refresh_every = refresh
        self.query_text = ""
        self.pane = "detail"
        self.stream = "stderr"
        self.selected: str | None = None
        self.plan_run: str | None = None  # the run selected in the plans pane
        self.snapshot: Snapshot | None = None
        self._seen_event = 0

    def compose(self) -> ComposeResult:
        with Vertical(id="main"):
            yield Static("loading…", id="status")
            yield Input(placeholder="filter: name, alias or state", id="filter", disabled=True)
            yield DataTable(id="instances", cursor_type="row", zebra_stripes=True)
            yield Static(
                "No instances yet. Create one with:  llama-orch init NAME --model PATH", id="empty"
            )
            with ContentSwitcher(initial="detail", id="bottom"):
                with Horizontal(id="detail"):
                    yield Static("", id="config")
                    yield LogTail(id="logtail", highlight=False)
                yield Log(id="events", highlight=False)
                with Vertical(id="gpus"):
                    yield DataTable(id="gpu-table", cursor_type="none")
                    yield Static("", id="gpu-warnings")
                with Vertical(id="plans"):
                    yield Static(
                        "No plan runs yet; `llama-orch plan run FILE` starts one.",
                        id="plans-empty",
                    )
                    with Horizontal(id="plan-tables"):
                        yield DataTable(id="plan-runs", cursor_type="row")
                        yield DataTable(id="plan-tasks", cursor_type="row")
            yield Footer(compact=True)  # every key fits 80 columns, ? Help and q Quit too
        yield Static("", id="too-small")

    def on_mount(self) -> None:
        table = self.query_one("#instances", DataTable)
        for col in COLUMNS:
            table.add_column(col, key=col)
        gpus = self.query_one("#gpu-table", DataTable)
        for col in GPU_COLUMNS:
            gpus.add_column(col)
        for table_id, labels in (
            ("#plan-runs", PLAN_RUN_COLUMNS),
            ("#plan-tasks", PLAN_TASK_COLUMNS),
        ):
            plan_table = self.query_one(table_id, DataTable)
            for col in labels:
                plan_table.add_column(col, key=col)
        table.focus()
        self.refresh_data()
        self.set_interval(self.refresh_every, self.refresh_data)
        self._check_size(self.size.width, self.size.height)

    # --- data -------------------------------------------------------------

    @work(thread=True, exclusive=True, group="snapshot")
    def refresh_data(self) -> None:
        try:
            snap = self.source.snapshot(with_gpus=self.pane == "gpus")
        except Exception as exc:  # a broken store or a dying daemon: say so, keep running
            snap = Snapshot("", error=f"{type(exc).__name__}: {exc}")
        self.call_from_thread(self._apply_unless_quitting, snap)

    def _apply_unless_quitting(self, snap: Snapshot) -> None:
        with suppress(NoMatches):  # a snapshot that arrived while the app quits
            self.apply(snap)

    def apply(self, snap: Snapshot) -> None:
        self.snapshot = snap
        status = self.query_one("#status", Static)
        if snap.error:
            status.update(
                Text(f"{self.source.home.root} — cannot read state: {snap.error}", style="bold red")
            )
            return
        away = "".join(f"; peer {n} does not answer" for n in snap.unreached)
        status.update(f"{self.source.home.root} — {snap.mode}{away}")
        self._apply_table([v for v in snap.instances if matches(v, self.query_text)])
        if self.selected is not None and self._peer_row(self.selected) is None:
            self._load_detail(self.selected)  # the pane follows the state, as the table does
        self._apply_events(snap)
        self._apply_gpus(snap)
        self._apply_plans(snap)

    def _apply_table(self, rows: list[InstanceView], width: int | None = None) -> None:
        table = self.query_one("#instances", DataTable)
        empty = self.query_one("#empty", Static)
        no_instances = not (self.snapshot and self.snapshot.instances)
        empty.display = no_instances
        table.display = not no_instances
        # HOST while any peer's instance is shown (filtered or not: no jumping columns)
        hosts = any(v.machine for v in (self.snapshot.instances if self.snapshot else rows))
        every = HOST_COLUMNS if hosts else COLUMNS
        full = {v.key: host_cells(v) if hosts else cells(v) for v in rows}
        # what fits whole (the scrollbar takes two cells): nothing cut at the edge
        keep = shown_columns(every, list(full.values()), (width or self.size.width) - 2)
        labels = [every[i] for i in keep]
        if [str(c.label) for c in table.ordered_columns] != labels:
            table.clear(columns=True)
            for col in labels:
                table.add_column(col, key=col)
        wanted = [v.key for v in rows]
        values = {k: [row[i] for i in keep] for k, row in full.items()}
        if sync_rows(table, labels, values) and self.selected in wanted:
            table.move_cursor(row=wanted.index(self.selected))
        if rows and self.selected not in wanted:
            self._select(rows[table.cursor_row if table.cursor_row < len(rows) else 0].key)

    def _apply_events(self, snap: Snapshot) -> None:
        log = self.query_one("#events", Log)
        for e in snap.events:
            if e["id"] > self._seen_event:
                log.write_line(
                    f"{e['ts']}  {e['instance'] or '-':<14} {e['kind']:<10} {e['message']}"
                )
                self._seen_event = e["id"]

    def _apply_gpus(self, snap: Snapshot) -> None:
        if snap.gpus is None:
            return
        table = self.query_one("#gpu-table", DataTable)
        temp = GPU_COLUMNS.index("TEMP")
        rows: list[list[Text | str]] = []
        for g in snap.gpus.gpus:
            row, hot = gpu_cells(g, snap.gpus.threshold)
            rows.append(
                [*row[:temp], Text(row[temp], style="bold red" if hot else ""), *row[temp + 1 :]]
            )
        if not rows:
            rows.append(["-", "no GPU found", *[""] * (len(GPU_COLUMNS) - 2)])
        table.clear()
        for r in rows:
            table.add_row(*r)
        fit_columns(table, rows)
        warnings = "\n".join(f"⚠ {w}" for w in snap.gpus.warnings)
        self.query_one("#gpu-warnings", Static).update(Text(warnings, style="yellow"))

    def _apply_plans(self, snap: Snapshot) -> None:
        runs = {r["id"]: r for r in snap.plans}
        self.query_one("#plans-empty", Static).display = not runs
        self.query_one("#plan-tables", Horizontal).display = bool(runs)
        table = self.query_one("#plan-runs", DataTable)
        values = {i: styled(plan_run_cells(r), PLAN_STATE_STYLES) for i, r in runs.items()}
        if sync_rows(table, PLAN_RUN_COLUMNS, values) and self.plan_run in runs:
            table.move_cursor(row=list(runs).index(self.plan_run))
        if self.plan_run not in runs:
            self.plan_run = next(iter(runs), None)
        self._show_tasks()
        self.refresh_bindings()  # cancel and retry follow the run's state

    def _show_tasks(self) -> None:
        run = self._run_data(self.plan_run)
        tasks = run["tasks"] if run else []
        table = self.query_one("#plan-tasks", DataTable)
        table.border_title = f"run {run['id']}: {run['state']}" if run else ""
        values = {t["id"]: styled(plan_task_cells(t, 40), PLAN_STATE_STYLES) for t in tasks}
        sync_rows(table, PLAN_TASK_COLUMNS, values)

    def _run_data(self, run_id: str | None) -> dict[str, Any] | None:
        plans = self.snapshot.plans if self.snapshot else []
        return next((r for r in plans if r["id"] == run_id), None)

    @on(DataTable.RowHighlighted, "#plan-runs")
    def _run_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key.value is not None and event.row_key.value != self.plan_run:
            self.plan_run = str(event.row_key.value)
            self._show_tasks()
            self.refresh_bindings()

    @on(DataTable.RowSelected, "#plan-tasks")
    def _task_chosen(self) -> None:
        self.action_task_output()

    # --- selection and detail -----------------------------------------------

    @on(DataTable.RowHighlighted, "#instances")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key.value is not None:
            self._select(str(event.row_key.value))

    def _select(self, name: str) -> None:
        if name == self.selected:
            return
        try:
            tail = self.query_one("#logtail", LogTail)
        except NoMatches:  # a highlight that arrived while the app quits
            return
        self.selected = name
        if (peer := self._peer_row(name)) is not None:
            tail.say(name, f"{peer.name}'s logs are on {peer.machine}.")
            self._show_detail(peer_detail(peer))
            return
        tail.show(self.source, name, self.stream)
        self._load_detail(name)

    def _peer_row(self, key: str) -> InstanceView | None:
        """The peer's instance `key` names (None: one of this machine's)."""
        rows = self.snapshot.instances if self.snapshot else []
        return next((v for v in rows if v.machine and v.key == key), None)

    @work(thread=True, exclusive=True, group="detail")
    def _load_detail(self, name: str) -> None:
        try:
            d = self.source.describe(name)
        except Exception as exc:
            text = f"{name}: {exc}"
        else:
            cfg = d.get("config", {})
            model = d.get("model") or {}
            text = "\n".join(
                [
                    f"[b]{name}[/b]  {d['state']} (desired {d['desired']})",
                    f"model   {(d.get('model_path') or '-').rsplit('/', 1)[-1]}",
                    f"        {model.get('architecture', '')} {model.get('file_type', '')}"
                    + (
                        f", ~{human_bytes(model['estimate_gpu_bytes'])} GPU"
                        if model.get("estimate_gpu_bytes")
                        else ""
                    ),
                    f"listen  {d['host']}:{d['port']}  alias {d['alias']}",
                    f"ctx     {cfg.get('model', {}).get('context_size')}  slots {cfg.get('server', {}).get('parallel')}",
                    f"gpu     {d['backend']} {d['gpu_devices'] or ''}",
                    f"restart {cfg.get('restart_policy', {}).get('mode') or 'on-failure'}",
                    f"last    {exit_text(last) if (last := d.get('last_exit')) else '-'}",
                ]
            )
            od = cfg.get("on_demand") or {}
            if line := on_demand_line(d, od.get("idle_ttl"), time.time()):
                text += f"\nidle    {line}"
        self.call_from_thread(self._show_detail, text)

    def _show_detail(self, text: str) -> None:
        with suppress(NoMatches):  # a detail that arrived while the app quits
            self.query_one("#config", Static).update(text)

    # --- actions ----------------------------------------------------------------

    def _target(self) -> str | None:
        if self.selected is None:
            self.notify("No instance selected.", severity="warning")
        elif (peer := self._peer_row(self.selected)) is not None:
            self.notify(
                f"{peer.name} runs on peer {peer.machine}: act on it there "
                f"(`llama-orch --host <ssh address of {peer.machine}> …`).",
                severity="warning",
            )
            return None
        return self.selected

    def action_up(self) -> None:
        if name := self._target():
            self._run("up", name)

    def action_down(self) -> None:
        self._confirm_then("down", "Stop")

    def action_restart(self) -> None:
        self._confirm_then("restart", "Restart")

    def _confirm_then(self, verb: str, question: str) -> None:
        if name := self._target():
            self._ask(f"{question} [b]{name}[/b]?", lambda: self._run(verb, name))

    def _ask(self, question: str, then: Callable[[], object]) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                then()

        self.push_screen(ConfirmScreen(question), answered)

    @work(thread=True, group="actions")
    def _run(self, verb: str, subject: str, label: str | None = None) -> None:
        """source.<verb>(subject) in a worker; what it says, or its error, is
        notified (the core's one-sentence messages, shown as they are)."""
        label = label or f"{verb} {subject}"
        self.call_from_thread(self.notify, f"{label}…")
        try:
            said = getattr(self.source, verb)(subject)
        except Exception as exc:
            self.call_from_thread(
                self.notify, str(exc), title=f"{label} failed", severity="error", timeout=10
            )
        else:
            if isinstance(said, str):
                self.call_from_thread(self.notify, said)
        self.call_from_thread(self.refresh_data)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """The plan actions only in the plans pane (and only there in the footer),
        and each only where it can do something: cancel a run still running,
        retry one with tasks that did not complete."""
        if action not in ("task_output", "cancel_plan", "retry_plan"):
            return True
        if self.pane != "plans":
            return False
        if action == "task_output":
            return True
        run = self._run_data(self.plan_run)
        verbs = run_verbs(run["state"], run.get("counts") or {}) if run else frozenset()
        return action.removesuffix("_plan") in verbs

    def action_task_output(self) -> None:
        table = self.query_one("#plan-tasks", DataTable)
        if self.plan_run is None or not table.row_count:
            self.notify("No plan task selected.", severity="warning")
            return
        task = str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
        self.push_screen(TaskOutputScreen(self.source, self.plan_run, task))

    def action_cancel_plan(self) -> None:
        self._confirm_plan("cancel_plan", "Cancel plan run", "cancel")

    def action_retry_plan(self) -> None:
        self._confirm_plan("retry_plan", "Retry the failed tasks of plan run", "retry")

    def _confirm_plan(self, verb: str, question: str, label: str) -> None:
        run_id = self.plan_run
        if run_id is None:
            self.notify("No plan run selected.", severity="warning")
            return
        self._ask(
            f"{question} [b]{run_id}[/b]?",
            lambda: self._run(verb, run_id, f"plan {label} {run_id}"),
        )

    def action_logs(self) -> None:
        if name := self._target():
            self.push_screen(LogScreen(self.source, name, self.stream))

    def action_stream(self) -> None:
        self.stream = "stdout" if self.stream == "stderr" else "stderr"
        if self.selected and self._peer_row(self.selected) is None:
            self.query_one("#logtail", LogTail).show(self.source, self.selected, self.stream)

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.disabled = False
        box.add_class("visible")
        box.focus()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.query_text = event.value
        if self.snapshot:
            self.apply(self.snapshot)

    @on(Input.Submitted, "#filter")
    def _filter_done(self) -> None:
        self.query_one("#instances", DataTable).focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = ""
        box.remove_class("visible")
        box.disabled = True
        self.query_one("#instances", DataTable).focus()

    def action_pane(self, pane: str) -> None:
        self.pane = "detail" if self.pane == pane else pane
        self.query_one("#bottom", ContentSwitcher).current = self.pane
        self.query_one("#plan-runs" if self.pane == "plans" else "#instances", DataTable).focus()
        self.refresh_bindings()
        if self.pane == "gpus":
            self.refresh_data()

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    # --- size ---------------------------------------------------------------------

    def on_resize(self, event: Any) -> None:
        self._check_size(event.size.width, event.size.height)
        if self.snapshot is not None and not self.snapshot.error:
            shown = [v for v in self.snapshot.instances if matches(v, self.query_text)]
            self._apply_table(shown, event.size.width)

    def _check_size(self, width: int, height: int) -> None:
        small = width < MIN_WIDTH or height < MIN_HEIGHT
        self.screen.set_class(small, "too-small")
        if small:
            self.query_one("#too-small", Static).update(
                f"The terminal is {width}×{height}; the dashboard needs at least "
                f"{MIN_WIDTH}×{MIN_HEIGHT}. Make the window larger."
            )
