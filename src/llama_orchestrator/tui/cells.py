"""What the dashboard's tables show: each row's cells, columns that fit,
rows kept in step with the data (pure, but for the table they fill)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from rich.cells import cell_len
from rich.text import Text
from textual.widgets import DataTable

from llama_orchestrator.present import (
    STATE_STYLES,
    backend_label,
    state_label,
)
from llama_orchestrator.timefmt import human_duration
from llama_orchestrator.tui.data import InstanceView

__all__ = [
    "cells",
    "host_cells",
    "peer_detail",
    "column_widths",
    "fit_columns",
    "sync_rows",
    "styled",
    "COLUMNS",
    "HOST_COLUMNS",
    "shown_columns",
]

HEALTH = {"healthy": "ok", "unhealthy": "failing", "starting": "loading"}
COLUMNS = (
    "NAME",
    "STATE",
    "HEALTH",
    "PID",
    "PORT",
    "ALIAS",
    "BACKEND",
    "RESTARTS",
    "UPTIME",
    "CPU%",
    "RSS",
    "ACTIVE",
    "TOK/S",
    "NEXT TRY",
)
#: with peers' instances (`fleet`): where each runs, first
HOST_COLUMNS = ("HOST", *COLUMNS)


def cells(v: InstanceView) -> tuple[Text | str, ...]:
    """The table row of one instance (pure)."""
    s = v.status
    state = state_label(s)
    backend = backend_label(s)
    dash = "-"
    return (
        s["name"],
        Text(state, style=STATE_STYLES.get(s["state"], "")),
        HEALTH.get(s["state"], dash),
        str(s["pid"] or dash),
        str(s["port"] or dash),
        s["alias"] or dash,
        backend,
        str(s["restarts"]),
        human_duration(s["uptime_s"]),
        dash if v.cpu_pct is None else f"{v.cpu_pct:.0f}",
        dash if v.rss_mib is None else f"{v.rss_mib:.0f}M",
        dash if v.active is None else str(v.active),
        dash if v.tokens_per_s is None else f"{v.tokens_per_s:.1f}",
        next_at[11:19] if (next_at := s["next_restart_at"]) else dash,  # HH:MM:SS of the ISO time
    )


def host_cells(v: InstanceView) -> tuple[Text | str, ...]:
    """The row of one instance in a table with HOST (pure)."""
    return (v.machine or "local", *cells(v))


def peer_detail(v: InstanceView) -> str:
    """What the detail pane says of a peer's instance: its row, and where to
    manage it (its logs, config and actions are on that machine) (pure)."""
    s = v.status
    return "\n".join(
        [
            f"[b]{s['name']}[/b] on peer [b]{v.machine}[/b]  {state_label(s)}",
            f"model   {(s.get('model_path') or '-').rsplit('/', 1)[-1]}",
            f"listen  {s.get('host')}:{s.get('port')}  alias {s.get('alias')}",
            f"gpu     {backend_label(s)}",
            "",
            f"It is managed on {v.machine}: `llama-orch --host <ssh address of {v.machine}> "
            "dashboard` shows its logs and config and acts on it.",
        ]
    )


def column_widths(labels: Sequence[str], rows: Iterable[Sequence[Text | str]]) -> list[int]:
    """Each column's content width: its widest cell, at least its label (pure)."""
    widths = [cell_len(label) for label in labels]
    for row in rows:
        for i, cell in enumerate(row):
            text = (
                Text.from_markup(cell) if isinstance(cell, str) else cell
            )  # as DataTable draws it
            widths[i] = max(widths[i], text.cell_len)
    return widths


#: the columns a narrow terminal drops first (NAME, STATE and HOST stay)
DROP_ORDER = (
    "HEALTH",
    "NEXT TRY",
    "CPU%",
    "BACKEND",
    "RESTARTS",
    "TOK/S",
    "ALIAS",
    "UPTIME",
    "ACTIVE",
    "PORT",
    "RSS",
    "PID",
)


def shown_columns(
    labels: Sequence[str], rows: Sequence[Sequence[Text | str]], width: int
) -> list[int]:
    """The indices of the columns that fit `width` cells whole (pure): the
    others dropped in DROP_ORDER, so that nothing is cut at the edge (an RSS
    of 335M read as 335). Each column takes its content and two of padding."""
    widths = column_widths(labels, rows)
    keep = list(range(len(labels)))
    for label in DROP_ORDER:
        if sum(widths[i] + 2 for i in keep) <= width:
            break
        if label in labels:
            keep.remove(labels.index(label))
    return keep


def fit_columns(table: DataTable, rows: Sequence[Sequence[Text | str]]) -> None:
    """Size the columns now, in the same call that changed the cells.

    Textual measures them on the table's next idle, and a paint that came first
    was cached with the labels' widths ("smok" for smoke-one) until a cell changed.
    """
    columns = table.ordered_columns
    for column, width in zip(
        columns, column_widths([c.label.plain for c in columns], rows), strict=True
    ):
        column.content_width = width


def sync_rows(
    table: DataTable, labels: Sequence[str], values: Mapping[str, Sequence[Text | str]]
) -> bool:
    """Make `table` show `values` (key -> cells) in order: rebuilt when the
    keys changed (True), else only changed cells updated (no flicker, the
    cursor stays)."""
    wanted = list(values)
    if wanted != [str(k.value) for k in table.rows]:
        table.clear()
        for key, row in values.items():
            table.add_row(*row, key=key)
        rebuilt = True
    else:
        for key, row in values.items():
            for col, value in zip(labels, row, strict=True):
                if str(table.get_cell(key, col)) != str(value):
                    table.update_cell(key, col, value, update_width=True)
        rebuilt = False
    fit_columns(table, list(values.values()))
    return rebuilt


def styled(cells_: list[str], styles: dict[str, str]) -> list[Text | str]:
    """The cells with the state (third column) coloured."""
    return [*cells_[:2], Text(cells_[2], style=styles.get(cells_[2], "")), *cells_[3:]]
