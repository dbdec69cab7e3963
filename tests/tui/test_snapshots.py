"""SVG snapshots of the main screens with deterministic data (pytest-textual-snapshot).

After an intended change of the look: `pytest tests/tui --snapshot-update`, then
review the SVGs under tests/tui/__snapshots__/ like any other diff."""

from textual.widgets import Log, Static

from llama_orchestrator.tui.app import DashboardApp
from tests.tui.conftest import until

SIZE = (120, 34)


def settled(*keys: str):
    """run_before: wait for data, the selection, the log tail and detail, then press `keys`."""

    async def run_before(pilot) -> None:
        app = pilot.app
        await until(lambda: app.selected == "gpt-oss")
        await until(lambda: len(app.query_one("#logtail", Log).lines) >= 5)
        await until(lambda: "Q4_K_M" in str(app.query_one("#config", Static).render()))
        await pilot.press(*keys)
        await pilot.pause()

    return run_before


def test_main_screen(snap_compare, source):
    assert snap_compare(
        DashboardApp(source, refresh=3600), terminal_size=SIZE, run_before=settled()
    )


def test_gpu_pane(snap_compare, source):
    async def run_before(pilot):
        await settled("g")(pilot)
        await until(lambda: pilot.app.query_one("#gpu-table").row_count == 2)

    assert snap_compare(
        DashboardApp(source, refresh=3600), terminal_size=SIZE, run_before=run_before
    )


def test_events_pane(snap_compare, source):
    async def run_before(pilot):
        await settled("e")(pilot)
        await until(lambda: len(pilot.app.query_one("#events", Log).lines) >= 1)

    assert snap_compare(
        DashboardApp(source, refresh=3600), terminal_size=SIZE, run_before=run_before
    )


def test_help_screen(snap_compare, source):
    assert snap_compare(
        DashboardApp(source, refresh=3600), terminal_size=SIZE, run_before=settled("question_mark")
    )


def test_plans_pane(snap_compare, source):
    async def run_before(pilot):
        await settled("p")(pilot)
        await until(lambda: pilot.app.query_one("#plan-tasks").row_count == 3)

    assert snap_compare(
        DashboardApp(source, refresh=3600), terminal_size=SIZE, run_before=run_before
    )
