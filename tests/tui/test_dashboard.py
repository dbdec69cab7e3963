"""The dashboard driven with Textual's Pilot, as a person would use it."""

from rich.text import Text
from textual.widgets import DataTable, Log, Static

from llama_orchestrator.tui.app import DashboardApp
from llama_orchestrator.tui.cells import COLUMNS, column_widths, shown_columns
from llama_orchestrator.tui.data import InstanceView
from llama_orchestrator.tui.screens import KEYS_HELP, ConfirmScreen, HelpScreen, LogScreen
from tests.fakes.fake_source import FakeSource, status
from tests.tui.conftest import until


def rows(app):
    table = app.query_one("#instances", DataTable)
    return [(str(k.value), str(table.get_cell(k, "STATE"))) for k in table.rows]


async def test_table_shows_every_instance_and_selection_drives_the_detail(source):
    app = DashboardApp(source, refresh=60)
    async with app.run_test(size=(130, 36)) as pilot:
        await until(lambda: len(rows(app)) == 3)
        assert rows(app) == [
            ("gpt-oss", "healthy*"),
            ("qwen-7b", "starting*"),
            ("llama-8b", "exited"),
        ]
        table = app.query_one("#instances", DataTable)
        assert str(table.get_cell("gpt-oss", "BACKEND")) == "cuda:0,3"
        assert str(table.get_cell("gpt-oss", "TOK/S")) == "41.5"
        assert str(table.get_cell("gpt-oss", "UPTIME")) == "2m05s"
        await until(lambda: app.selected == "gpt-oss")
        await pilot.press("down")
        await until(lambda: app.selected == "qwen-7b")
        log = app.query_one("#logtail", Log)
        await until(lambda: "qwen-7b stderr line 4" in "\n".join(log.lines))
        config = app.query_one("#config", Static)
        await until(lambda: "qwen-7b" in str(config.render()))
        assert "Q4_K_M" in str(config.render())
        await pilot.press("s")  # switch the tail to stdout
        await until(lambda: "qwen-7b stdout line" in "\n".join(log.lines))


async def test_a_click_selects_a_row(source):
    app = DashboardApp(source, refresh=60)
    async with app.run_test(size=(130, 36)) as pilot:
        await until(lambda: app.selected == "gpt-oss")
        await pilot.click("#instances", offset=(3, 3))  # header, gpt-oss, qwen-7b, llama-8b
        await until(lambda: app.selected == "llama-8b")


async def test_filter_by_name_alias_or_state(source):
    app = DashboardApp(source, refresh=60)
    async with app.run_test(size=(130, 36)) as pilot:
        await until(lambda: len(rows(app)) == 3)
        await pilot.press("slash", *"exit")
        await until(lambda: [n for n, _ in rows(app)] == ["llama-8b"])
        await pilot.press("escape")
        await until(lambda: len(rows(app)) == 3)


async def test_up_acts_at_once_and_down_and_restart_ask_first(source):
    app = DashboardApp(source, refresh=60)
    async with app.run_test(size=(130, 36)) as pilot:
        await until(lambda: app.selected == "gpt-oss")
        await pilot.press("down", "down")
        await until(lambda: app.selected == "llama-8b")
        await pilot.press("u")
        await until(lambda: ("up", "llama-8b") in source.calls)
        await until(
            lambda: ("llama-8b", "healthy*") in rows(app) or ("llama-8b", "healthy") in rows(app)
        )
        await pilot.press("d")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert ("down", "llama-8b") not in source.calls and not isinstance(
            app.screen, ConfirmScreen
        )
        await pilot.press("d", "y")
        await until(lambda: ("down", "llama-8b") in source.calls)
        await pilot.press("r", "y")
        await until(lambda: ("restart", "llama-8b") in source.calls)


async def test_a_failed_action_is_shown_and_the_app_keeps_running(source):
    source.fail = "Port 8003 on 127.0.0.1 is already in use by another program."
    app = DashboardApp(source, refresh=60)
    async with app.run_test(size=(130, 36)) as pilot:
        await until(lambda: app.selected == "gpt-oss")
        await pilot.press("u")
        await until(lambda: any("already in use" in str(n.message) for n in app._notifications))
        assert app.is_running


async def test_full_screen_logs_and_back(source):
    app = DashboardApp(source, refresh=60)
    async with app.run_test(size=(130, 36)) as pilot:
        await until(lambda: app.selected == "gpt-oss")
        await pilot.press("l")
        assert isinstance(app.screen, LogScreen)
        log = app.screen.query_one(Log)
        await until(lambda: "gpt-oss stderr line 0" in "\n".join(log.lines))
        await pilot.press("s")
        await until(lambda: "gpt-oss stdout line" in "\n".join(log.lines))
        await pilot.press("escape")
        assert not isinstance(app.screen, LogScreen)


async def test_events_gpu_plans_and_help_panes(source):
    app = DashboardApp(source, refresh=60)
    async with app.run_test(size=(130, 36)) as pilot:
        await until(lambda: len(rows(app)) == 3)
        await pilot.press("e")
        events = app.query_one("#events", Log)
        await until(lambda: "answered /health with 200" in "\n".join(events.lines))
        await pilot.press("g")
        gpus = app.query_one("#gpu-table", DataTable)
        await until(lambda: gpus.row_count == 2)
        assert str(gpus.get_cell_at((1, 6))) == "90°C"
        warnings = app.query_one("#gpu-warnings", Static)
        await until(lambda: "over the 85 °C threshold" in str(warnings.render()))
        await pilot.press("p")
        await until(lambda: app.query_one("#plan-runs", DataTable).row_count == 2)
        await pilot.press("p")  # again: back to the details
        assert app.pane == "detail"
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")


async def test_terminal_too_small_says_so(source):
    app = DashboardApp(source, refresh=60)
    async with app.run_test(size=(50, 10)):
        msg = app.query_one("#too-small", Static)
        await until(lambda: msg.display and "needs at least 70×14" in str(msg.render()))
        assert not app.query_one("#main").display


async def test_no_instances_and_a_broken_store_are_messages(tmp_path):
    empty = FakeSource(tmp_path, n=0)
    app = DashboardApp(empty, refresh=60)
    async with app.run_test(size=(130, 36)):
        await until(lambda: app.query_one("#empty").display)
        assert "llama-orch init NAME --model PATH" in str(app.query_one("#empty", Static).render())

    broken = FakeSource(tmp_path)

    def boom(with_gpus):
        raise RuntimeError("state.sqlite cannot be used: it is a directory")

    broken.snapshot = boom
    app = DashboardApp(broken, refresh=60)
    async with app.run_test(size=(130, 36)):
        status = app.query_one("#status", Static)
        await until(lambda: "cannot read state" in str(status.render()))
        assert app.is_running


async def test_fifty_instances_load(tmp_path):
    app = DashboardApp(FakeSource(tmp_path, n=50), refresh=60)
    async with app.run_test(size=(130, 36)) as pilot:
        await until(lambda: len(rows(app)) == 50)
        await pilot.press(*["down"] * 49)
        await until(lambda: app.selected == "worker-46")


async def test_columns_are_sized_in_the_same_call_that_changes_the_cells(source):
    """Regression (flaky tmux test): a paint before Textual's deferred measuring
    was cached with the labels' widths, showing "smok" for smoke-one."""
    app = DashboardApp(source, refresh=60)
    async with app.run_test(size=(130, 36)):
        await until(lambda: len(rows(app)) == 3)
        table = app.query_one("#instances", DataTable)

        def width(col: str) -> int:  # the columns now (a narrower fit rebuilds them)
            return next(c for k, c in table.columns.items() if k.value == col).content_width

        source.instances[1].status["state"] = "backoff"
        source.instances[1].status["next_restart_at"] = "2026-11-22T06:00:03+00:00"
        app.apply(source.snapshot(with_gpus=False))  # no await: nothing idles in between
        assert width("NEXT TRY") == len("06:00:03")  # a cell changed in place
        source.instances[0].status["name"] = "a-much-longer-instance-name"
        app.apply(source.snapshot(with_gpus=False))  # the rows are rebuilt
        assert width("NAME") == len("a-much-longer-instance-name")
        source.instances[0].status["name"] = "gpt"  # narrower again: the column shrinks
        app.apply(source.snapshot(with_gpus=False))
        assert width("NAME") == len("llama-8b")


def test_column_widths_are_the_widest_cell_or_the_label():
    assert column_widths(["NAME", "STATE"], []) == [4, 5]
    assert column_widths(
        ["NAME", "STATE"], [("smoke-one", Text("healthy")), ("a", Text("backoff (3.2s)"))]
    ) == [9, 14]
    assert column_widths(["GPU"], [("显卡",)]) == [4]  # wide characters take two cells


async def test_on_demand_instances_show_idle_and_the_countdown(source):
    source.instances[0].status.update(on_demand=True, idle_stop_in_s=252.0, supervised=True)
    source.instances[2].status.update(on_demand=True, state="stopped")
    app = DashboardApp(source, refresh=60)
    async with app.run_test(size=(130, 36)):
        await until(lambda: len(rows(app)) == 3)
        assert rows(app) == [
            ("gpt-oss", "healthy (idle stop 4m12s)"),
            ("qwen-7b", "starting*"),
            ("llama-8b", "idle (on demand)"),
        ]


def plan_rows(app, table_id):
    table = app.query_one(table_id, DataTable)
    return [(str(k.value), str(table.get_cell(k, "STATE"))) for k in table.rows]


async def test_the_plans_pane_shows_runs_tasks_and_output_and_cancels_and_retries(source):
    """Issue 23.2: runs, a run's tasks, a task's output; cancel/retry ask first."""
    from llama_orchestrator.tui.screens import TaskOutputScreen

    app = DashboardApp(source, refresh=60)
    async with app.run_test(size=(130, 36)) as pilot:
        await until(lambda: app.selected == "gpt-oss")
        assert "Cancel run" not in _footer(app)  # plan keys only in the plans pane
        await pilot.press("p")
        await until(lambda: len(plan_rows(app, "#plan-runs")) == 2)
        assert plan_rows(app, "#plan-runs") == [
            ("20261122-0601-b2", "failed"),
            ("20261122-0600-a1", "completed"),
        ]
        assert plan_rows(app, "#plan-tasks") == [
            ("fetch", "completed"),
            ("summarise", "failed"),
            ("publish", "skipped"),
        ]
        tasks = app.query_one("#plan-tasks", DataTable)
        assert "HTTP 500 from gpt-oss" in str(tasks.get_cell("summarise", "ERROR"))
        # a failed run may be retried, not cancelled: it has ended
        assert "Retry run" in _footer(app) and "Cancel run" not in _footer(app)
        await pilot.press("down")  # the other run: its tasks
        await until(lambda: plan_rows(app, "#plan-tasks") == [("root", "completed")])
        # a completed run: nothing to cancel, nothing to retry
        await until(lambda: "Retry run" not in _footer(app))
        assert "Cancel run" not in _footer(app)
        await pilot.press("up", "tab", "enter")  # the first run's first task: its output
        await until(lambda: isinstance(app.screen, TaskOutputScreen))
        out = app.screen.query_one("#task-output", Log)
        await until(lambda: "fetched 3 files" in "\n".join(out.lines))
        assert "a warning" in "\n".join(out.lines)
        await pilot.press("escape")
        await pilot.press("t")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await until(lambda: ("retry_plan", "20261122-0601-b2") in source.calls)
        await until(lambda: ("summarise", "pending") in plan_rows(app, "#plan-tasks"))
        # running again: now it may be cancelled, and not retried
        await until(lambda: "Cancel run" in _footer(app))
        assert "Retry run" not in _footer(app)
        await pilot.press("c", "n")  # asked, answered no: nothing cancelled
        assert ("cancel_plan", "20261122-0601-b2") not in source.calls
        source.fail = "Plan run 20261122-0601-b2 has ended; nothing to cancel."
        await pilot.press("c", "y")
        await until(lambda: ("cancel_plan", "20261122-0601-b2") in source.calls)
        await until(lambda: any("nothing to cancel" in str(n.message) for n in app._notifications))
        await pilot.press("p")  # back to the details: plan keys are gone again
        await pilot.press("c")
        assert not isinstance(app.screen, ConfirmScreen)


async def test_the_plans_pane_without_runs_says_how_to_start_one(source):
    source.plans = []
    app = DashboardApp(source, refresh=60)
    async with app.run_test(size=(130, 36)) as pilot:
        await until(lambda: app.selected == "gpt-oss")
        await pilot.press("p")
        empty = app.query_one("#plans-empty", Static)
        await until(lambda: empty.display)
        assert "llama-orch plan run FILE" in str(empty.render())
        await pilot.press("o")  # nothing to open: a warning, no screen
        assert app.screen is app.screen_stack[0]


def _footer(app) -> str:
    """The descriptions of the keys the footer shows now."""
    return " ".join(
        b.binding.description
        for b in app.screen.active_bindings.values()
        if b.binding.show and b.enabled
    )


def test_the_header_names_the_daemon_and_its_router_or_why_there_is_none():
    from llama_orchestrator.daemon.info import DaemonInfo
    from llama_orchestrator.tui.data import header

    info = DaemonInfo(7, 0.0, 0.0, "unix", router_url="http://127.0.0.1:8080")
    assert header(info) == "daemon pid 7; router http://127.0.0.1:8080/v1"
    info = DaemonInfo(7, 0.0, 0.0, "unix", router_error="port 8080 is in use")
    assert header(info).endswith("; no router: port 8080 is in use")
    assert "`llama-orch up` starts one" in header(None)


async def test_peers_instances_show_where_they_run_and_are_managed_there(source):
    peer_row = status("tiny", "healthy", 8001, 777, supervised=True)
    source.instances.append(InstanceView(peer_row, machine="rig2"))
    source.unreached = {"rig3": "http://10.0.0.3:8080 does not answer"}
    app = DashboardApp(source, refresh=60)
    async with app.run_test(size=(150, 36)) as pilot:
        await until(lambda: len(rows(app)) == 4)
        table = app.query_one("#instances", DataTable)
        assert [str(c.label) for c in table.ordered_columns][:3] == ["HOST", "NAME", "STATE"]
        assert str(table.get_cell("tiny@rig2", "HOST")) == "rig2"
        assert str(table.get_cell("gpt-oss", "HOST")) == "local"
        assert rows(app)[-1] == ("tiny@rig2", "healthy")
        assert "peer rig3 does not answer" in str(app.query_one("#status", Static).render())
        await pilot.press("down", "down", "down")
        await until(lambda: app.selected == "tiny@rig2")
        config = app.query_one("#config", Static)
        await until(lambda: "on peer rig2" in str(config.render()))
        assert "tiny.gguf" in str(config.render())
        log = app.query_one("#logtail", Log)
        await until(lambda: log.lines == ["tiny's logs are on rig2."])
        await pilot.press("d")  # its actions are on rig2: said, not asked, not done
        await pilot.press("u")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmScreen) and source.calls == []
        await pilot.press("l")
        await pilot.pause()
        assert not isinstance(app.screen, LogScreen)
        await pilot.press("slash", *"rig2")
        await until(lambda: [n for n, _ in rows(app)] == ["tiny@rig2"])
        # the columns stay while a filter hides every peer's row
        await pilot.press(*["backspace"] * 4, *"gpt")
        await until(lambda: [n for n, _ in rows(app)] == ["gpt-oss"])
        assert str(table.ordered_columns[0].label) == "HOST"


def screen_lines(app) -> list[str]:
    """The screen's text, line by line, from Textual's own screenshot."""
    import html
    import re

    lines: dict[float, list[tuple[float, str]]] = {}
    for m in re.finditer(
        r'<text class="[^"]*" x="([\d.]+)" y="([\d.]+)"[^>]*>(.*?)</text>', app.export_screenshot()
    ):
        lines.setdefault(float(m.group(2)), []).append((float(m.group(1)), m.group(3)))
    return [
        html.unescape("".join(t for _, t in sorted(parts))).replace("\xa0", " ")
        for _, parts in sorted(lines.items())
    ]


async def test_at_80x24_every_key_shows_and_no_cell_is_cut(source):
    """Issue 40: the footer hid `? Help` and `q Quit`; RSS read 335 for 335M."""
    app = DashboardApp(source, refresh=60)
    async with app.run_test(size=(80, 24)):
        await until(lambda: len(rows(app)) == 3)
        await until(lambda: any("q Quit" in line for line in screen_lines(app)))
        lines = screen_lines(app)
        assert any("? Help" in line and "q Quit" in line for line in lines)  # the footer
        table = app.query_one("#instances", DataTable)
        shown = [str(c.label) for c in table.ordered_columns]
        assert shown[:2] == ["NAME", "STATE"] and "RSS" in shown and "HEALTH" not in shown
        assert sum(c.content_width + 2 for c in table.ordered_columns) <= 78
        assert any("2048M" in line for line in lines)  # whole, not 2048
    app = DashboardApp(source, refresh=60)
    async with app.run_test(size=(200, 36)):  # wide: every column
        await until(lambda: len(rows(app)) == 3)
        table = app.query_one("#instances", DataTable)
        assert len(table.ordered_columns) == len(COLUMNS)


async def test_the_detail_pane_follows_the_state_and_says_how_it_last_ended(source):
    """Issue 40: it went stale until the selection moved, and showed `last None`
    for a process killed by a signal."""
    app = DashboardApp(source, refresh=60)
    async with app.run_test(size=(130, 36)) as pilot:
        await until(lambda: app.selected == "gpt-oss")
        await pilot.press("down", "down")
        await until(lambda: app.selected == "llama-8b")
        config = app.query_one("#config", Static)
        await until(lambda: "llama-8b  exited" in str(config.render()))
        status = source.instances[2].status
        status["state"], status["desired"] = "healthy", "running"
        status["last_exit"] = {"code": None, "signal": 9, "at": None, "stderr_tail": []}
        app.apply(source.snapshot(with_gpus=False))  # a refresh, the selection unmoved
        await until(lambda: "llama-8b  healthy (desired running)" in str(config.render()))
        assert "last    was killed by signal 9 (SIGKILL)" in str(config.render())


async def test_the_help_fits_its_dialog_at_80_columns(source):
    app = DashboardApp(source, refresh=60)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("question_mark")
        await until(lambda: isinstance(app.screen, HelpScreen))
        dialog = app.screen.query_one("#dialog")
        room = dialog.content_region.width
        plain = [Text.from_markup(line).cell_len for line in KEYS_HELP.splitlines()]
        assert max(plain) <= room  # no line wraps back to column 0


def test_narrow_tables_drop_the_least_needed_columns_first():
    labels = ("NAME", "STATE", "HEALTH", "PID", "RSS", "NEXT TRY")
    row = ("gpt-oss", "healthy", "ok", "4242", "335M", "-")
    widths = [max(len(a), len(b)) + 2 for a, b in zip(labels, row, strict=True)]
    assert shown_columns(labels, [row], sum(widths)) == [0, 1, 2, 3, 4, 5]
    assert shown_columns(labels, [row], sum(widths) - 1) == [0, 1, 3, 4, 5]  # HEALTH first
    assert shown_columns(labels, [row], 30) == [0, 1, 3, 4]
    assert shown_columns(labels, [row], 5) == [0, 1]  # NAME and STATE always


async def test_a_narrower_terminal_drops_columns_at_once(source):
    app = DashboardApp(source, refresh=60)
    async with app.run_test(size=(200, 36)) as pilot:
        await until(lambda: len(rows(app)) == 3)
        table = app.query_one("#instances", DataTable)
        assert "HEALTH" in [str(c.label) for c in table.ordered_columns]
        await pilot.resize_terminal(80, 24)
        await until(lambda: "HEALTH" not in [str(c.label) for c in table.ordered_columns])
        assert rows(app)[0] == ("gpt-oss", "healthy*")  # the rows stay
