"""Vulkan devices as `vulkaninfo` reports them (issue 20): pure parsing.

The index of a device here is its place in the loader's enumeration, which
is what llama.cpp's Vulkan backend takes in `GGML_VK_VISIBLE_DEVICES`
(vulkaninfo and llama-server ask the same loader). `vulkaninfo` ships with
Debian's vulkan-tools and with the Vulkan runtime that GPU drivers install
on Windows, and its text output is the same on both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llama_orchestrator.errors import OrchError

__all__ = ["VulkanDevice", "VulkanInfoError", "parse_vulkaninfo", "NO_DRIVER_MARKERS", "VENDORS"]

#: what vulkaninfo prints when the loader is there but no driver (ICD) is:
#: no Vulkan device, which is not a fault worth a warning
NO_DRIVER_MARKERS = ("ERROR_INCOMPATIBLE_DRIVER", "Found no drivers", "ERROR_INITIALIZATION_FAILED")

#: PCI vendor ids, to tell whose card a device is
VENDORS = {0x10DE: "nvidia", 0x1002: "amd", 0x8086: "intel", 0x10005: "mesa"}


class VulkanInfoError(OrchError):
    """vulkaninfo printed something we cannot read."""


@dataclass(frozen=True)
class VulkanDevice:
    index: int
    name: str
    #: "discrete", "integrated", "virtual", "cpu" or "other"
    kind: str
    vendor_id: int | None
    driver: str | None
    #: deviceUUID, lower case with dashes (for NVIDIA cards it is NVML's UUID)
    uuid: str | None
    #: "0000:03:00.0" where the driver reports VK_EXT_pci_bus_info
    pci: str | None
    #: the DEVICE_LOCAL heaps, summed
    memory_total_bytes: int
    #: their usage under VK_EXT_memory_budget; None where the driver lacks it
    memory_used_bytes: int | None

    @property
    def software(self) -> bool:
        """A renderer on the CPU (Mesa's llvmpipe/lavapipe, SwiftShader): not a GPU."""
        return self.kind == "cpu"

    @property
    def vendor(self) -> str | None:
        return None if self.vendor_id is None else VENDORS.get(self.vendor_id)


_GPU = re.compile(r"^GPU(\d+):\s*$")
_PAIR = re.compile(r"^\s*(\w+)\s*=\s*(.*?)\s*$")
_HEAP = re.compile(r"^\s*memoryHeaps\[(\d+)\]:\s*$")
_KINDS = {
    "PHYSICAL_DEVICE_TYPE_DISCRETE_GPU": "discrete",
    "PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU": "integrated",
    "PHYSICAL_DEVICE_TYPE_VIRTUAL_GPU": "virtual",
    "PHYSICAL_DEVICE_TYPE_CPU": "cpu",
}


def _int(text: str) -> int:
    """`2147483648 (0x80000000) (2.00 GiB)`, `0x1002`, `3`: the first number."""
    word = text.split()[0]
    return int(word, 16) if word.lower().startswith("0x") else int(word)


def _device(index: int, lines: list[str]) -> VulkanDevice:
    props: dict[str, str] = {}  # first value of each key in the device's sections
    heaps: dict[int, dict[str, str]] = {}
    heap: int | None = None
    for line in lines:
        if m := _HEAP.match(line):
            heap = int(m.group(1))
            heaps[heap] = {}
            continue
        if heap is not None:
            if line.startswith("memoryTypes") or not line.startswith(("\t", " ")):
                heap = None
            elif "MEMORY_HEAP_DEVICE_LOCAL_BIT" in line:
                heaps[heap]["local"] = "1"
            elif m := _PAIR.match(line):
                heaps[heap][m.group(1)] = m.group(2)
            continue
        if m := _PAIR.match(line):
            props.setdefault(m.group(1), m.group(2))
    name = props.get("deviceName")
    if not name:
        raise VulkanInfoError(f"vulkaninfo reported GPU{index} without a deviceName")
    try:
        local = [h for h in heaps.values() if h.get("local")]
        used = [_int(h["usage"]) for h in local if "usage" in h]
        pci = None
        if all(k in props for k in ("pciDomain", "pciBus", "pciDevice", "pciFunction")):
            pci = (
                f"{_int(props['pciDomain']):04x}:{_int(props['pciBus']):02x}:"
                f"{_int(props['pciDevice']):02x}.{_int(props['pciFunction']):x}"
            )
        return VulkanDevice(
            index=index,
            name=name,
            kind=_KINDS.get(props.get("deviceType", ""), "other"),
            vendor_id=_int(props["vendorID"]) if "vendorID" in props else None,
            driver=props.get("driverName") or props.get("driverID"),
            uuid=props["deviceUUID"].lower() if props.get("deviceUUID") else None,
            pci=pci,
            memory_total_bytes=sum(_int(h["size"]) for h in local if "size" in h),
            memory_used_bytes=sum(used) if local and len(used) == len(local) else None,
        )
    except (ValueError, IndexError) as exc:
        raise VulkanInfoError(
            f"vulkaninfo reported GPU{index} ({name}) with values that are not numbers"
        ) from exc


def parse_vulkaninfo(text: str) -> list[VulkanDevice]:
    """`vulkaninfo` (its default text output): one device per `GPUn:` section
    of "Device Properties and Extensions", in the loader's order."""
    sections: dict[int, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if m := _GPU.match(line):
            current = sections.setdefault(int(m.group(1)), [])
        elif current is not None:
            current.append(line)
    if not sections and "VULKANINFO" not in text:
        raise VulkanInfoError("vulkaninfo printed no report (no VULKANINFO header)")
    return [_device(i, lines) for i, lines in sorted(sections.items())]
