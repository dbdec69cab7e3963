"""Card health: too hot, or gone (pure alerts + recording new ones as events).

`ps` and `gpus` call `check`; the daemon (issue 3) should call it every
`gpu.sample_interval` seconds. An alert is recorded once, when it starts, and
its end once, when it clears."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from llama_orchestrator.gpus.discover import Discovery, GpuInfo, card_index, discover
from llama_orchestrator.gpus.vulkan import VulkanDevice
from llama_orchestrator.store.database import Store

__all__ = ["Alert", "alerts", "record_changes", "GpuStatus", "check"]


@dataclass(frozen=True)
class Alert:
    device: int
    kind: str  # "gpu_hot" | "gpu_missing"
    message: str


def alerts(
    gpus: list[GpuInfo],
    pinned: dict[int, list[str]],
    threshold: float,
    seen: set[int] | None = None,
) -> list[Alert]:
    """Cards over `threshold` °C, and pinned cards that no longer report: of
    those, only ones reported before (`seen`; None: every pinned card), as a
    card that never was there did not fall off anything."""
    out = []
    present = {g.index for g in gpus}
    for g in gpus:
        if g.temperature_c is not None and g.temperature_c > threshold:
            who = f" (used by {', '.join(pinned[g.index])})" if pinned.get(g.index) else ""
            out.append(
                Alert(
                    g.index,
                    "gpu_hot",
                    f"GPU {g.index} ({g.name}) is at {g.temperature_c:.0f} °C, over the "
                    f"{threshold:.0f} °C threshold{who}",
                )
            )
    gone = set(pinned) - present
    for dev in sorted(gone if seen is None else gone & seen):
        out.append(
            Alert(
                dev,
                "gpu_missing",
                f"GPU {dev} is pinned by {', '.join(pinned[dev])} but no longer reported "
                "(fell off the bus? check risers, power and `nvidia-smi`)",
            )
        )
    return out


def record_changes(store: Store, current: list[Alert], checked: set[int]) -> list[Alert]:
    """Record alerts that started and cleared since the last check; return the new ones."""
    last: dict[int, str] = {}
    for e in store.latest_of_kinds(("gpu_hot", "gpu_missing", "gpu_ok")):  # newest first
        if "device" in e.data:
            last.setdefault(int(e.data["device"]), e.kind)
    now = {a.device: a for a in current}
    started = [a for a in current if last.get(a.device) != a.kind]
    with store.transaction():
        for a in started:
            store.add_event(None, a.kind, a.message, {"device": a.device})
        for dev in sorted(checked):
            if dev not in now and last.get(dev) in ("gpu_hot", "gpu_missing"):
                store.add_event(None, "gpu_ok", f"GPU {dev} is back to normal", {"device": dev})
    return started


@dataclass
class GpuStatus:
    gpus: list[GpuInfo]
    warnings: list[str]
    source: str
    threshold: float = 85.0  # °C above which a card is hot
    #: Vulkan devices no row stands for (software ones, an iGPU next to NVIDIA cards)
    unlisted: list[VulkanDevice] = field(default_factory=list)


def on_rows(
    pinned: dict[int, list[str]], backends: Mapping[str, str], gpus: list[GpuInfo]
) -> dict[int, list[str]]:
    """`pinned` (each instance's devices as its backend counts them) keyed by
    the rows' own indices: a vulkan instance on Vulkan device 2 is on the CUDA
    card Vulkan calls 2. Devices no row stands for keep their number."""
    out: dict[int, list[str]] = {}
    for device, names in pinned.items():
        for name in names:
            card = card_index(gpus, backends.get(name, ""), device)
            out.setdefault(device if card is None else card, []).append(name)
    return out


def check(
    pinned: dict[int, list[str]],
    store: Store,
    threshold: float,
    find_gpus: Callable[[], Discovery] = discover,
    backends: Mapping[str, str] | None = None,
) -> GpuStatus:
    """One sample: live GPUs with the instances pinned to each, the warnings to
    show (alerts and unreadable sources), alerts recorded as events. What `ps`,
    `gpus` and `describe` call, and what the daemon should call every
    `gpu.sample_interval` seconds."""
    found = find_gpus()
    pinned = on_rows(pinned, backends or {}, found.gpus)
    for g in found.gpus:
        g.instances = pinned.get(g.index, [])
    store.mark_gpus_seen([(g.backend, g.index, g.name) for g in found.gpus])
    current = alerts(found.gpus, pinned, threshold, store.gpus_seen())
    record_changes(store, current, {g.index for g in found.gpus} | set(pinned))
    return GpuStatus(
        found.gpus,
        [a.message for a in current] + found.notes,
        found.source,
        threshold,
        found.unlisted,
    )
