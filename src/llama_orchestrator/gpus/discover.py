"""GPU discovery: NVML, then nvidia-smi, then rocm-smi (issue 8), each card
joined with its Vulkan device and, for AMD, amdgpu's sysfs readings (issue 20).

One row per physical card: a card NVML or ROCm reports carries the index
Vulkan gives it too (`vulkan_index`, matched by UUID or PCI address); where
neither reports any card (AMD or Intel on Vulkan alone, Windows included)
the Vulkan devices are the rows. Software renderers (Mesa's llvmpipe) are
never rows: they are listed in `Discovery.vulkan` only, where a Vulkan pin
is checked against them.

Parsers and the merge are pure (text in, GpuInfo out) and tested on recorded
outputs; the runners only find and run the tools. On a machine without GPUs
nothing is found on PATH and NVML is absent, so discovery costs a few
milliseconds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from llama_orchestrator.errors import OrchError
from llama_orchestrator.gpus.amdgpu import AmdReading, read_cards
from llama_orchestrator.gpus.vulkan import (
    NO_DRIVER_MARKERS,
    VulkanDevice,
    VulkanInfoError,
    parse_vulkaninfo,
)

__all__ = [
    "GpuInfo",
    "GpuQueryError",
    "Discovery",
    "discover",
    "parse_nvidia_smi",
    "parse_rocm_smi",
    "merge",
    "seen_by",
    "card_index",
    "probe_vulkan",
    "VulkanCache",
    "NVIDIA_SMI_QUERY",
    "ROCM_SMI_ARGS",
]

NVIDIA_SMI_QUERY = "index,name,uuid,memory.total,memory.used,memory.free,utilization.gpu,temperature.gpu,power.draw"
ROCM_SMI_ARGS = [
    "--showproductname",
    "--showmeminfo",
    "vram",
    "--showuse",
    "--showtemp",
    "--showpower",
    "--showbus",
    "--json",
]
TOOL_TIMEOUT = 10
#: how long one vulkaninfo answer is used (the daemon samples every few
#: seconds; the enumeration only changes with the drivers)
VULKAN_TTL_S = 30.0


class GpuQueryError(OrchError):
    """A GPU tool answered with something we cannot read."""


@dataclass
class GpuInfo:
    index: int
    name: str
    backend: str  # "cuda", "rocm" or "vulkan": whose index `index` is
    memory_total_mib: int
    #: None where the source does not report it (Vulkan without a memory budget)
    memory_used_mib: int | None
    utilization_pct: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    uuid: str | None = None
    #: the PCI address, "0000:03:00.0", where the source reports it
    pci: str | None = None
    #: the index llama.cpp's Vulkan backend gives this card (GGML_VK_VISIBLE_DEVICES)
    vulkan_index: int | None = None
    instances: list[str] = field(default_factory=list)
    #: where it is in its life (`gpus.leases.CARD_STATES`), and its script's lease
    state: str | None = None
    lease: dict[str, Any] | None = None

    @property
    def memory_free_mib(self) -> int:
        """What is free; all of it where the use is unknown (as good a guess
        as any, and the fit check says which figures it had)."""
        return max(0, self.memory_total_mib - (self.memory_used_mib or 0))

    @property
    def unknown(self) -> list[str]:
        """The readings its source does not give, named for people."""
        readings = {
            "memory used": self.memory_used_mib,
            "utilization": self.utilization_pct,
            "temperature": self.temperature_c,
            "power": self.power_w,
        }
        return [what for what, v in readings.items() if v is None]

    def index_for(self, backend: str) -> int | None:
        """The index `backend` gives this card; None where it does not see it."""
        if backend == self.backend:
            return self.index
        return self.vulkan_index if backend == "vulkan" else None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "memory_free_mib": self.memory_free_mib, "unknown": self.unknown}


@dataclass
class Discovery:
    source: str  # "nvml", "nvidia-smi", "rocm-smi", "vulkaninfo" or "none"
    gpus: list[GpuInfo]
    notes: list[str] = field(default_factory=list)  # why a source was skipped
    #: every Vulkan device the loader lists, software ones included; None
    #: where Vulkan could not be asked (no vulkaninfo), so no pin is refused
    vulkan: list[VulkanDevice] | None = None

    @property
    def unlisted(self) -> list[VulkanDevice]:
        """Vulkan devices no row stands for: software renderers, and next to
        NVML or ROCm cards a device none of them is (an integrated GPU)."""
        listed = {g.vulkan_index for g in self.gpus}
        return [d for d in self.vulkan or [] if d.index not in listed]

    def devices_of(self, backend: str) -> dict[int, str] | None:
        """Index -> name of what `backend` can be pinned to here; None where
        discovery cannot tell (a backend it does not ask, Vulkan not asked)."""
        if backend == "vulkan":
            return None if self.vulkan is None else {d.index: d.name for d in self.vulkan}
        if backend in ("cuda", "rocm"):
            return {g.index: g.name for g in seen_by(self.gpus, backend)}
        return None


def seen_by(gpus: list[GpuInfo], backend: str) -> list[GpuInfo]:
    """The cards `backend` sees, each as a copy indexed the way that backend
    counts (a CUDA card's Vulkan index for "vulkan")."""
    out = []
    for g in gpus:
        i = g.index_for(backend)
        if i is not None:
            out.append(g if g.backend == backend else replace(g, index=i))
    return out


def card_index(gpus: list[GpuInfo], backend: str, device: int) -> int | None:
    """The row index of the card that `backend` calls `device`."""
    return next((g.index for g in gpus if g.index_for(backend) == device), None)


def _num(text: str) -> float | None:
    text = text.strip()
    if not text or text.startswith("[") or text.upper() in ("N/A", "NAN"):
        return None  # "[N/A]", "[Not Supported]"
    return float(text)


def parse_nvidia_smi(text: str) -> list[GpuInfo]:
    """`nvidia-smi --query-gpu=NVIDIA_SMI_QUERY --format=csv,noheader,nounits`."""
    gpus = []
    for n, line in enumerate(text.strip().splitlines(), 1):
        cols = [c.strip() for c in line.split(",")]
        if len(cols) != 9:
            raise GpuQueryError(
                f"nvidia-smi line {n} has {len(cols)} fields, expected 9: {line[:80]!r}"
            )
        try:
            index, total, used = int(cols[0]), _num(cols[3]), _num(cols[4])
            gpus.append(
                GpuInfo(
                    index=index,
                    name=cols[1],
                    backend="cuda",
                    uuid=cols[2] or None,
                    memory_total_mib=int(total or 0),
                    memory_used_mib=None if used is None else int(used),
                    utilization_pct=_num(cols[6]),
                    temperature_c=_num(cols[7]),
                    power_w=_num(cols[8]),
                )
            )
        except ValueError as exc:
            raise GpuQueryError(
                f"nvidia-smi line {n} is not numbers where expected: {line[:80]!r}"
            ) from exc
    return gpus


def _first(d: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if k in d and d[k] not in ("", "N/A"):
            return d[k]
    return None


def _float_of(d: dict[str, Any], *keys: str) -> float | None:
    v = _first(d, *keys)
    return None if v is None else float(v)


def parse_rocm_smi(text: str) -> list[GpuInfo]:
    """`rocm-smi ROCM_SMI_ARGS`: {"card0": {...}, ...}; key names vary by ROCm version."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GpuQueryError(
            f"rocm-smi did not print JSON ({exc.msg} at line {exc.lineno})"
        ) from exc
    if not isinstance(data, dict):
        raise GpuQueryError("rocm-smi printed JSON that is not an object of cards")
    gpus = []
    for key, card in sorted(data.items()):
        if not key.startswith("card") or not isinstance(card, dict):
            continue  # e.g. "system"
        try:
            index = int(key[4:])
            total = _first(card, "VRAM Total Memory (B)")
            used = _first(card, "VRAM Total Used Memory (B)")
            gpus.append(
                GpuInfo(
                    index=index,
                    name=str(
                        _first(card, "Card Series", "Card series", "Card model", "Card SKU") or key
                    ),
                    backend="rocm",
                    memory_total_mib=int(int(total or 0) / (1024 * 1024)),
                    memory_used_mib=None if used is None else int(int(used) / (1024 * 1024)),
                    utilization_pct=_float_of(card, "GPU use (%)"),
                    temperature_c=_float_of(
                        card, "Temperature (Sensor edge) (C)", "Temperature (Sensor junction) (C)"
                    ),
                    pci=_pci(_first(card, "PCI Bus")),
                    power_w=_float_of(
                        card,
                        "Average Graphics Package Power (W)",
                        "Current Socket Graphics Package Power (W)",
                    ),
                    uuid=_first(card, "Unique ID"),
                )
            )
        except (TypeError, ValueError) as exc:
            raise GpuQueryError(
                f"rocm-smi reported {key} with values that are not numbers"
            ) from exc
    return gpus


def _pci(text: Any) -> str | None:
    """ "0000:03:00.0" from rocm-smi's or NVML's bus id (NVML pads the domain to 8)."""
    if not text:
        return None
    text = text.decode() if isinstance(text, bytes) else str(text)
    parts = text.strip().lower().split(":")
    if len(parts) != 3:
        return None
    return f"{int(parts[0], 16):04x}:{parts[1]}:{parts[2]}"


def _uuid_key(uuid: str | None) -> str | None:
    """NVML's "GPU-6d65..." and Vulkan's "6d65..." name the same card."""
    if not uuid:
        return None
    u = uuid.lower()
    return u[4:] if u.startswith("gpu-") else u


def _mib(n: int | None) -> int | None:
    return None if n is None else int(n // (1024 * 1024))


def _vulkan_row(d: VulkanDevice, amd: AmdReading | None) -> GpuInfo:
    """A card Vulkan alone reports, with amdgpu's live readings where it has them."""
    total = amd.memory_total_bytes if amd and amd.memory_total_bytes else d.memory_total_bytes
    used = amd.memory_used_bytes if amd and amd.memory_used_bytes is not None else None
    return GpuInfo(
        index=d.index,
        name=d.name,
        backend="vulkan",
        memory_total_mib=int(total // (1024 * 1024)),
        memory_used_mib=_mib(used if used is not None else d.memory_used_bytes),
        utilization_pct=amd.utilization_pct if amd else None,
        temperature_c=amd.temperature_c if amd else None,
        power_w=amd.power_w if amd else None,
        uuid=d.uuid,
        pci=d.pci,
        vulkan_index=d.index,
    )


def merge(
    cards: list[GpuInfo],
    vulkan: list[VulkanDevice],
    amd: dict[str, AmdReading],
) -> list[GpuInfo]:
    """One row per physical card.

    Cards NVML or ROCm report get the Vulkan index of the same card (by
    UUID, else PCI address). With no such card, the hardware Vulkan devices
    are the rows. Software devices are never rows (llvmpipe is the CPU), nor,
    next to NVML or ROCm cards, a Vulkan device none of them is (an iGPU):
    `Discovery.unlisted` names both."""
    hardware = [d for d in vulkan if not d.software]
    if not cards:
        return [_vulkan_row(d, amd.get(d.pci or "")) for d in hardware]
    by_uuid = {_uuid_key(d.uuid): d for d in hardware if d.uuid}
    by_pci = {d.pci: d for d in hardware if d.pci}
    rows, matched = [], set()
    for g in cards:
        d = by_uuid.get(_uuid_key(g.uuid) or "") or by_pci.get(g.pci or "")
        if d is None or d.index in matched:
            rows.append(g)
            continue
        matched.add(d.index)
        rows.append(replace(g, vulkan_index=d.index, pci=g.pci or d.pci))
    return rows


def _optional(fn: Callable[..., Any], *args: Any) -> Any:
    """An NVML reading that some cards do not support: None then."""
    try:
        return fn(*args)
    except Exception:
        return None


def _from_nvml() -> list[GpuInfo] | None:
    """NVML through nvidia-ml-py (the `nvidia` extra); None when unavailable."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver: fall back to the tools
        return None
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            name = pynvml.nvmlDeviceGetName(h)
            util = _optional(pynvml.nvmlDeviceGetUtilizationRates, h)
            temp = _optional(pynvml.nvmlDeviceGetTemperature, h, 0)  # 0 = NVML_TEMPERATURE_GPU
            power_mw = _optional(pynvml.nvmlDeviceGetPowerUsage, h)
            uuid = _optional(pynvml.nvmlDeviceGetUUID, h)
            pci = _optional(pynvml.nvmlDeviceGetPciInfo, h)
            gpus.append(
                GpuInfo(
                    index=i,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    backend="cuda",
                    memory_total_mib=int(mem.total // (1024 * 1024)),
                    memory_used_mib=int(mem.used // (1024 * 1024)),
                    utilization_pct=None if util is None else float(util.gpu),
                    temperature_c=None if temp is None else float(temp),
                    power_w=None if power_mw is None else power_mw / 1000.0,
                    uuid=uuid.decode() if isinstance(uuid, bytes) else uuid,
                    pci=None if pci is None else _pci(pci.busId),
                )
            )
        return gpus
    finally:
        pynvml.nvmlShutdown()


def _run(tool: str, args: list[str]) -> str | None:
    exe = shutil.which(tool)
    if exe is None:
        return None
    try:
        r = subprocess.run([exe, *args], capture_output=True, text=True, timeout=TOOL_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise GpuQueryError(f"{tool} did not answer within {TOOL_TIMEOUT}s") from exc
    except OSError as exc:
        raise GpuQueryError(f"{tool} could not be run: {exc.strerror}") from exc
    if r.returncode != 0:
        detail = (r.stderr or r.stdout).strip().splitlines()
        raise GpuQueryError(f"{tool} failed (exit {r.returncode}): {detail[-1] if detail else ''}")
    return r.stdout


VulkanProbe = Callable[[], tuple[list[VulkanDevice] | None, list[str]]]


def probe_vulkan() -> tuple[list[VulkanDevice] | None, list[str]]:
    """The Vulkan devices (None: no vulkaninfo here, so Vulkan was not asked)
    and why they could not be read."""
    try:
        out = _run("vulkaninfo", [])
        return (None if out is None else parse_vulkaninfo(out)), []
    except (GpuQueryError, VulkanInfoError) as exc:
        if any(m in str(exc) for m in NO_DRIVER_MARKERS):
            return [], []  # a loader without a driver: no Vulkan device, nothing wrong
        return None, [str(exc)]


class VulkanCache:
    """`probe_vulkan`, its answer used for `ttl` seconds: for the daemon, which
    samples the cards every few seconds while the enumeration only changes
    with the drivers. Live use comes from NVML, ROCm or sysfs; only a card
    Vulkan alone sees off Linux (AMD on Windows) shows a use up to `ttl` old."""

    def __init__(self, ttl: float = VULKAN_TTL_S, probe: VulkanProbe = probe_vulkan) -> None:
        self.ttl, self.probe = ttl, probe
        self._lock = threading.Lock()
        self._last: tuple[float, tuple[list[VulkanDevice] | None, list[str]]] | None = None

    def __call__(self) -> tuple[list[VulkanDevice] | None, list[str]]:
        with self._lock:
            now = time.monotonic()
            if self._last is None or now - self._last[0] >= self.ttl:
                self._last = (now, self.probe())
            return self._last[1]


def _primary(notes: list[str]) -> tuple[str, list[GpuInfo]]:
    """The cards of the first vendor source that reports any."""
    nvml = _from_nvml()
    if nvml:
        return "nvml", nvml
    sources: list[tuple[str, list[str], Callable[[str], list[GpuInfo]]]] = [
        (
            "nvidia-smi",
            [f"--query-gpu={NVIDIA_SMI_QUERY}", "--format=csv,noheader,nounits"],
            parse_nvidia_smi,
        ),
        ("rocm-smi", ROCM_SMI_ARGS, parse_rocm_smi),
    ]
    for tool, args, parse in sources:
        try:
            out = _run(tool, args)
            if out is None:
                continue
            gpus = parse(out)
        except GpuQueryError as exc:
            notes.append(str(exc))
            continue
        if gpus:
            return tool, gpus
    return "none", []


def discover(vulkan_probe: VulkanProbe = probe_vulkan) -> Discovery:
    """Every GPU here, one row per card. A source that exists but answers
    garbage is skipped with a note (and the next one tried), never a crash."""
    notes: list[str] = []
    source, cards = _primary(notes)
    vulkan, vk_notes = vulkan_probe()
    notes += vk_notes
    if not vulkan:
        return Discovery(source, cards, notes, vulkan)
    amd = read_cards() if not cards else {}
    rows = merge(cards, vulkan, amd)
    if not cards and rows:
        source = "vulkaninfo" + (" + amdgpu sysfs" if amd else "")
    return Discovery(source, rows, notes, vulkan)
