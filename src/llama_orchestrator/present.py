"""Shared presentation for the CLI and the dashboard: labels and colours (pure)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from llama_orchestrator.gpus.discover import GpuInfo
from llama_orchestrator.plans import WAITING
from llama_orchestrator.timefmt import human_duration

if TYPE_CHECKING:  # the engine is not imported to print a table
    from llama_orchestrator.engine.status import InstanceStatus
    from llama_orchestrator.gpus.vulkan import VulkanDevice

__all__ = [
    "ANSI",
    "columns",
    "GPU_COLUMNS",
    "STATE_STYLES",
    "state_label",
    "ago",
    "on_demand_line",
    "backend_label",
    "short_gpu_name",
    "gpu_cells",
    "backend_of",
    "unknown_line",
    "unlisted_line",
    "peer_line",
    "PLAN_RUN_COLUMNS",
    "PLAN_TASK_COLUMNS",
    "plan_run_cells",
    "plan_task_cells",
    "plan_waits",
    "plan_summary",
    "plan_cancelled",
    "plan_requeued",
    "PLAN_STATE_STYLES",
]

#: rich style per instance state
STATE_STYLES = {
    "healthy": "green",
    "queued": "cyan",
    "starting": "yellow",
    "unhealthy": "red",
    "backoff": "yellow",
    "stopping": "yellow",
    "stopped": "dim",
    "created": "dim",
    "exited": "red",
    "failed": "bold red",
}


GPU_COLUMNS = (
    "GPU", "NAME", "BACKEND", "VRAM", "FREE", "UTIL", "TEMP", "POWER", "INSTANCES", "STATE", "LEASE",
)  # fmt: skip
PLAN_RUN_COLUMNS = ("ID", "NAME", "STATE", "DONE", "CREATED", "ELAPSED")
PLAN_TASK_COLUMNS = ("TASK", "KIND", "STATE", "TRIES", "INSTANCE", "ELAPSED", "ERROR")
#: rich style per plan run and task state
PLAN_STATE_STYLES = {
    "completed": "green",
    "running": "yellow",
    "pending": "dim",
    "failed": "red",
    "skipped": "dim",
    "cancelled": "dim",
}


def plan_run_cells(run: dict[str, Any]) -> list[str]:
    """One row of `plan list` (a RunView.to_json())."""
    return [
        run["id"],
        run["name"],
        run["state"],
        f"{run['tasks_done']}/{run['tasks_total']}",
        run["created_at"],
        human_duration(run["elapsed_s"]),
    ]


def plan_task_cells(task: dict[str, Any], error_width: int = 60) -> list[str]:
    """One row of `plan status` (a task of RunView.to_json()): the error's end
    (where the cause is), or the beginning of what a ready task waits for."""
    elapsed = "-" if task["elapsed_s"] is None else f"{task['elapsed_s']:.1f}s"
    error = (task["error"] or "").replace("\n", " ")
    instance = task["instance"] or "-"
    if task.get("tier") == "external":  # an upstream answered: which tier, and what it cost
        cost = task.get("cost")
        instance += f" (external{'' if cost is None else f', cost {cost:.4f}'})"
    if error.startswith(WAITING):
        error = error if len(error) <= error_width else error[: error_width - 1] + "…"
    return [
        task["id"],
        task["kind"],
        task["state"],
        str(task["attempts"]),
        instance,
        elapsed,
        error[-error_width:],
    ]


def plan_waits(run: dict[str, Any]) -> list[str]:
    """`asr is waiting for a GPU: …`: what each ready task waits for, whole."""
    return [
        f"{t['id']} is {t['error']}"
        for t in run["tasks"]
        if t["state"] == "ready" and (t["error"] or "").startswith(WAITING)
    ]


def plan_cancelled(run_id: str, stopped: list[str]) -> str:
    """What `plan cancel` (and the dashboard's c) says."""
    return f"Cancelled plan run {run_id}" + (
        f" (stopped {', '.join(stopped)})." if stopped else "."
    )


def plan_requeued(run_id: str, again: list[str]) -> str:
    """What `plan retry` (and the dashboard's t) says."""
    return f"Plan run {run_id}: {len(again)} task(s) queued again ({', '.join(again)})."


def plan_summary(run: dict[str, Any]) -> str:
    counts = ", ".join(f"{n} {state}" for state, n in sorted(run["counts"].items()))
    return f"plan run {run['id']} ({run['name']}): {run['state']} — {counts}"


def state_label(status: InstanceStatus) -> str:
    """`healthy*`: the star marks a running instance nothing supervises;
    `backoff (3.2s)`: the next restart is due in 3.2 seconds; `idle (on demand)`:
    stopped until a request names it; `healthy (idle stop 4m12s)`: an on-demand
    instance stops after that long without requests; `queued (load 2 of 5)`:
    waiting for its turn to load; `starting (42%)`: that much of its model read."""
    position = status.get("load_position")
    if status["state"] == "queued":
        return f"queued (load {position[0]} of {position[1]})" if position else "queued"
    percent = status.get("load_progress")
    if status["state"] == "starting" and percent is not None and percent < 100:
        return f"starting ({percent}%)" + ("" if status["supervised"] else "*")
    if status.get("next_try_s") is not None:
        return f"{status['state']} ({status['next_try_s']:g}s)"
    if status.get("on_demand") and status["state"] in ("created", "stopped"):
        return "idle (on demand)"
    if status.get("idle_stop_in_s") is not None:
        return f"{status['state']} (idle stop {human_duration(status['idle_stop_in_s'])})"
    return status["state"] + ("*" if status["pid"] and not status["supervised"] else "")


def ago(iso_time: str | None, now: float) -> str:
    """`12s ago` for an ISO time, `-` for none."""
    if iso_time is None:
        return "-"
    return human_duration(max(0.0, now - datetime.fromisoformat(iso_time).timestamp())) + " ago"


def on_demand_line(status: InstanceStatus, idle_ttl: float | None, now: float) -> str | None:
    """`on demand: idle stop after 300s; last used 12s ago; stops in 4m48s`
    (`describe` and the dashboard's detail), None for an always-on instance."""
    if not status.get("on_demand"):
        return None
    parts = [f"idle stop after {idle_ttl:g}s" if idle_ttl else "on demand"]
    parts.append(f"last used {ago(status.get('last_used_at'), now)}")
    if status.get("idle_stop_in_s") is not None:
        parts.append(f"stops in {human_duration(status['idle_stop_in_s'])}")
    return "; ".join(parts)


def backend_label(status: InstanceStatus) -> str:
    """`cuda:0,3`, or the backend alone when nothing is pinned."""
    gpus = ",".join(str(g) for g in status["gpu_devices"])
    return f"{status['backend']}:{gpus}" if gpus else (status["backend"] or "-")


def build_label(build: dict[str, Any]) -> str:
    """A llama-server binary and what it was built for, from `Build.to_json`:
    `/opt/llama/llama-server (cuda)`, `… (cpu only)`."""
    from llama_orchestrator.gpus.builds import Build

    known = Build(build["binary"], frozenset(build["backends"]), bool(build["known"]))
    return f"{known.binary} ({known.label()})"


def short_gpu_name(name: str) -> str:
    """`NVIDIA GeForce GTX 1060 6GB` -> `GTX 1060 6GB`: the vendor is in the backend."""
    for prefix in ("NVIDIA GeForce ", "NVIDIA ", "AMD Radeon ", "AMD "):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def backend_of(g: GpuInfo) -> str:
    """Whose index the card's is, and Vulkan's too where it differs: `cuda (vk 1)`."""
    if g.vulkan_index is None or g.backend == "vulkan":
        return g.backend
    return f"{g.backend} (vk {g.vulkan_index})"


def unknown_line(g: GpuInfo, source: str) -> str | None:
    """What `gpus` says of a card whose source leaves readings out (rather than zeros)."""
    if not g.unknown:
        return None
    return f"GPU {g.index}: {source} reports no {', '.join(g.unknown)} for it (shown as - or ?)"


def unlisted_line(d: VulkanDevice, source: str) -> str:
    """What `gpus` says of a Vulkan device it lists no row for, and how to pin it."""
    what = (
        "a software renderer on the CPU, so not listed as a GPU"
        if d.software
        else f"not a card {source} reports, so not listed"
    )
    return (
        f"Vulkan device {d.index} is {d.name}, {what}; backend vulkan with "
        f"device_id {d.index} runs on it" + (" (for tests)" if d.software else "")
    )


def peer_line(name: str, peer: dict[str, Any]) -> str:
    """What `daemon status` says of one peer (`daemon.peers.PeerState.to_json`)."""
    where = f"{name} ({peer['url']})"
    if peer["state"] == "reachable":
        n = len(peer.get("instances") or [])
        return f"{where}: answers, {n} healthy instance{'s' * (n != 1)}"
    if peer["state"] == "unreachable":
        return f"{where}: does not answer: {peer.get('error') or 'unknown'}"
    return f"{where}: not asked yet"


def gpu_cells(g: GpuInfo, threshold: float) -> tuple[list[str], bool]:
    """The GPU_COLUMNS cells of one card, and whether it is over `threshold`."""
    hot = g.temperature_c is not None and g.temperature_c > threshold
    used = "?" if g.memory_used_mib is None else str(g.memory_used_mib)
    return [
        str(g.index),
        short_gpu_name(g.name),
        backend_of(g),
        f"{used}/{g.memory_total_mib} MiB",
        "?" if g.memory_used_mib is None else f"{g.memory_free_mib} MiB",
        "-" if g.utilization_pct is None else f"{g.utilization_pct:.0f}%",
        "-" if g.temperature_c is None else f"{g.temperature_c:.0f}°C",
        "-" if g.power_w is None else f"{g.power_w:.0f} W",
        ", ".join(g.instances) or "-",
        g.state or "-",
        f"{g.lease['task']} (plan {g.lease['plan']})" if g.lease else "-",
    ], hot


#: ANSI codes for the STATE_STYLES names, for plain-text tables
ANSI = {"green": "32", "yellow": "33", "red": "31", "dim": "2", "bold red": "1;31"}


def columns(
    headers: list[str],
    rows: list[list[str]],
    styles: list[str | None] | None = None,
    color: bool = False,
    state_at: int = 1,
) -> str:
    """A plain table like `docker ps`: padded columns, the last one unpadded.

    `styles[i]` colours row i's column `state_at` (the state) when `color` is on.
    rich would do the same at ~100 ms of import and rendering per call."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for n, row in enumerate(rows):
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=True)]
        style = (styles or [None] * len(rows))[n]
        if color and style in ANSI:
            cells[state_at] = f"\x1b[{ANSI[style]}m{cells[state_at]}\x1b[0m"
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
