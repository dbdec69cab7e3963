"""The dashboard's other screens: a log followed live, a plan task's
output, a question to confirm, the keys."""

from __future__ import annotations

from contextlib import suppress
from typing import ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, Log, Static
from textual.worker import get_current_worker

from llama_orchestrator.engine.logs import follow, tail_lines
from llama_orchestrator.tui.data import DataSource

__all__ = ["LogTail", "LogScreen", "TaskOutputScreen", "ConfirmScreen", "HelpScreen", "KEYS_HELP"]

KEYS_HELP = """\
[b]Keys[/b]
  ↑/↓      select an instance (or click it)
  u        up: start the selected instance
  d        down: stop it (asks first)
  r        restart it (asks first)
  l        its logs, full screen (s: stdout/stderr, esc: back)
  s        switch the log tail between stderr and stdout
  /        filter by name, alias or state (esc clears)
  e g p    events, GPU or plans pane (again: details)
  plans    ↑/↓ a run, tab to its tasks, o or enter: output;
           c cancel a running run, t retry its failed tasks
  ?        this help
  q        quit
"""


class LogTail(Log):
    """The last lines of one instance's log, following new ones (and rotation)."""

    def show(self, source: DataSource, name: str, stream: str) -> None:
        self.clear()
        self.border_title = f"{name} {stream}"
        self._tail(source, name, stream)

    def say(self, title: str, line: str) -> None:
        """No log to follow (a peer's instance): `line` instead."""
        self.workers.cancel_group(self, "tail")
        self.clear()
        self.border_title = title
        self.write_line(line)

    @work(thread=True, exclusive=True, group="tail")
    def _tail(self, source: DataSource, name: str, stream: str) -> None:
        worker = get_current_worker()
        path = source.log_paths(name)[stream]
        lines = follow({stream: path}, should_stop=lambda: worker.is_cancelled, interval=0.25)
        first = tail_lines(path, 300)
        if first:
            self.app.call_from_thread(self.write_lines, first)
        for _, line in lines:
            self.app.call_from_thread(self.write_line, line)


class LogScreen(Screen[None]):
    BINDINGS: ClassVar = [
        Binding("escape,l,q", "app.pop_screen", "Back"),
        Binding("s", "switch", "stdout/stderr"),
    ]

    def __init__(self, source: DataSource, name: str, stream: str) -> None:
        super().__init__()
        self.source, self.instance, self.stream = source, name, stream

    def compose(self) -> ComposeResult:
        yield LogTail(id="fulllog", highlight=False)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(LogTail).show(self.source, self.instance, self.stream)

    def action_switch(self) -> None:
        self.stream = "stdout" if self.stream == "stderr" else "stderr"
        self.query_one(LogTail).show(self.source, self.instance, self.stream)


class TaskOutputScreen(Screen[None]):
    """A plan task's output (a shell task's stderr after it), read once."""

    BINDINGS: ClassVar = [Binding("escape,o,q", "app.pop_screen", "Back")]

    def __init__(self, source: DataSource, run_id: str, task_id: str) -> None:
        super().__init__()
        self.source, self.run_id, self.task_id = source, run_id, task_id

    def compose(self) -> ComposeResult:
        yield Log(id="task-output", highlight=False)
        yield Footer()

    def on_mount(self) -> None:
        log = self.query_one("#task-output", Log)
        log.border_title = f"plan run {self.run_id}: task {self.task_id}"
        self._load()

    @work(thread=True)
    def _load(self) -> None:
        try:
            output, stderr = self.source.task_output(self.run_id, self.task_id)
        except Exception as exc:
            output, stderr = f"cannot read the output: {exc}", None
        lines = (output or "").splitlines() or ["(no output)"]
        if stderr:
            lines += ["", "--- stderr ---", *stderr.splitlines()]
        self.app.call_from_thread(self._show, lines)

    def _show(self, lines: list[str]) -> None:
        with suppress(NoMatches):
            self.query_one("#task-output", Log).write_lines(lines)


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS: ClassVar = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        yield Static(f"{self.question}\n\n[b]y[/b] yes    [b]n[/b] no", id="dialog")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar = [Binding("escape,question_mark,q", "app.pop_screen", "Close")]

    def compose(self) -> ComposeResult:
        yield Static(KEYS_HELP, id="dialog")
