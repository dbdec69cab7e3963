"""AMD cards' live readings from the amdgpu driver's sysfs files (Linux).

What an AMD card on Vulkan without ROCm has for use and temperature: the
kernel driver exposes them whatever userspace runs. Read by PCI address, so
they join the Vulkan device of the same card. Elsewhere (Windows, macOS, a
kernel without amdgpu) nothing is found and nothing is guessed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["AmdReading", "read_cards", "DRM_ROOT", "AMD_VENDOR"]

DRM_ROOT = Path("/sys/class/drm")
AMD_VENDOR = "0x1002"


@dataclass(frozen=True)
class AmdReading:
    pci: str
    memory_total_bytes: int | None
    memory_used_bytes: int | None
    utilization_pct: float | None
    temperature_c: float | None
    power_w: float | None


def _number(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _scaled(value: int | None, by: float) -> float | None:
    return None if value is None else value / by


def _hwmon(device: Path, name: str) -> int | None:
    for mon in sorted(device.glob("hwmon/hwmon*")):
        value = _number(mon / name)
        if value is not None:
            return value
    return None


def read_cards(root: Path = DRM_ROOT) -> dict[str, AmdReading]:
    """amdgpu cards under `root` (`card0`, `card1`, ...; not their connectors
    like `card0-DP-1`), keyed by PCI address ("0000:03:00.0")."""
    out: dict[str, AmdReading] = {}
    try:
        cards = sorted(p for p in root.glob("card*") if p.name[4:].isdigit())
    except OSError:
        return out
    for card in cards:
        device = card / "device"
        try:
            if (device / "vendor").read_text().strip().lower() != AMD_VENDOR:
                continue
            pci = device.resolve().name
        except OSError:
            continue
        power = _hwmon(device, "power1_average")
        out[pci] = AmdReading(
            pci=pci,
            memory_total_bytes=_number(device / "mem_info_vram_total"),
            memory_used_bytes=_number(device / "mem_info_vram_used"),
            utilization_pct=_scaled(_number(device / "gpu_busy_percent"), 1),
            temperature_c=_scaled(_hwmon(device, "temp1_input"), 1000),  # millidegrees
            power_w=_scaled(power if power is not None else _hwmon(device, "power1_input"), 1e6),
        )
    return out
