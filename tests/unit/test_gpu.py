import os
import sys
import types
from pathlib import Path

import pytest

from llama_orchestrator.gpus import discover as discovery
from llama_orchestrator.gpus.amdgpu import read_cards
from llama_orchestrator.gpus.discover import (
    GpuQueryError,
    card_index,
    discover,
    merge,
    parse_nvidia_smi,
    parse_rocm_smi,
    seen_by,
)
from llama_orchestrator.gpus.vulkan import VulkanInfoError, parse_vulkaninfo

FAKES = Path(__file__).parents[1] / "fakes"
OUTPUTS = FAKES / "gpu_outputs"
# the fakes first; then only the interpreter their shebang needs (hides real GPU tools)
FAKE_PATH = f"{FAKES / 'gpu_bin'}{os.pathsep}{Path(sys.executable).parent}"


def test_nvidia_smi_five_6gb_cards():
    gpus = parse_nvidia_smi((OUTPUTS / "five_1060.csv").read_text())
    assert [g.index for g in gpus] == [0, 1, 2, 3, 4]
    g1 = gpus[1]
    assert (g1.name, g1.memory_total_mib, g1.memory_used_mib, g1.memory_free_mib) == (
        "NVIDIA GeForce GTX 1060 6GB",
        6144,
        4012,
        2132,
    )
    assert (g1.utilization_pct, g1.temperature_c, g1.power_w) == (87, 68, 102.11)
    assert gpus[2].power_w is None  # "[N/A]"
    assert g1.to_json()["memory_free_mib"] == 2132


@pytest.mark.parametrize(
    "text", [(OUTPUTS / "garbage.txt").read_text(), "0, a, b, x, 1, 2, 3, 4, 5\n"]
)
def test_nvidia_smi_garbage_is_a_clear_error(text):
    with pytest.raises(GpuQueryError, match="nvidia-smi line 1"):
        parse_nvidia_smi(text)


def test_rocm_smi_cards_with_version_specific_keys():
    gpus = parse_rocm_smi((OUTPUTS / "rocm_two.json").read_text())
    assert [(g.index, g.backend) for g in gpus] == [(0, "rocm"), (1, "rocm")]
    assert gpus[0].memory_total_mib == 16368 and gpus[0].memory_used_mib == 970
    assert gpus[0].temperature_c == 52.0 and gpus[0].power_w == 31.0
    assert gpus[1].temperature_c == 48.0 and gpus[1].power_w == 12.0  # junction / socket keys
    assert gpus[1].uuid is None


@pytest.mark.parametrize(
    "text", ["not json", "[1, 2]", '{"card0": {"VRAM Total Memory (B)": "lots"}}']
)
def test_rocm_smi_garbage_is_a_clear_error(text):
    with pytest.raises(GpuQueryError, match="rocm-smi"):
        parse_rocm_smi(text)


def _fake_path(monkeypatch, nvidia=None, rocm=None, vulkan=None):
    monkeypatch.setenv("PATH", FAKE_PATH)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # NVML absent
    monkeypatch.setattr(discovery, "read_cards", lambda: {})  # this machine's sysfs left out
    for var, name in (
        ("FAKE_NVIDIA_SMI", nvidia),
        ("FAKE_ROCM_SMI", rocm),
        ("FAKE_VULKANINFO", vulkan),
    ):
        if name:
            monkeypatch.setenv(var, str(OUTPUTS / name))
        else:
            monkeypatch.delenv(var, raising=False)


@pytest.mark.posix  # the fake tools are shebang scripts
def test_discover_prefers_nvidia_smi_then_rocm_smi(monkeypatch):
    _fake_path(monkeypatch, nvidia="five_1060.csv", rocm="rocm_two.json")
    d = discover()
    assert d.source == "nvidia-smi" and len(d.gpus) == 5 and d.notes == []


@pytest.mark.posix  # the fake tools are shebang scripts
def test_discover_falls_back_past_a_broken_tool_with_a_note(monkeypatch):
    _fake_path(monkeypatch, nvidia=None, rocm="rocm_two.json")  # nvidia-smi exits 9
    d = discover()
    assert d.source == "rocm-smi" and len(d.gpus) == 2
    assert "nvidia-smi failed (exit 9)" in d.notes[0] and "NVIDIA driver" in d.notes[0]
    _fake_path(monkeypatch, nvidia="garbage.txt", rocm=None)
    d = discover()
    assert d.source == "none" and d.gpus == [] and len(d.notes) == 2


def test_discover_without_any_tool_is_none_and_quiet(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "pynvml", None)
    d = discover()
    assert (d.source, d.gpus, d.notes) == ("none", [], [])


def _fake_nvml(cards, fail_power=False, fail_init=False):
    mod = types.ModuleType("pynvml")
    calls = []

    def init():
        calls.append("init")
        if fail_init:
            raise RuntimeError("NVML_ERROR_DRIVER_NOT_LOADED")

    mod.nvmlInit = init
    mod.nvmlShutdown = lambda: calls.append("shutdown")
    mod.nvmlDeviceGetCount = lambda: len(cards)
    mod.nvmlDeviceGetHandleByIndex = lambda i: cards[i]
    mod.nvmlDeviceGetName = lambda h: h["name"].encode()
    mod.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=h["total"], used=h["used"])
    mod.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=h["util"])
    mod.nvmlDeviceGetTemperature = lambda h, sensor: h["temp"]
    mod.nvmlDeviceGetUUID = lambda h: h.get("uuid", "GPU-0f3a1c2e-0000-0000-0000-000000000000")
    mod.nvmlDeviceGetPciInfo = lambda h: types.SimpleNamespace(busId=b"00000000:04:00.0")

    def power(h):
        if fail_power:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return h["mw"]

    mod.nvmlDeviceGetPowerUsage = power
    return mod, calls


@pytest.mark.posix  # the fake tools are shebang scripts
def test_nvml_comes_first_and_unsupported_readings_are_none(monkeypatch):
    card = {
        "name": "NVIDIA H100",
        "total": 80 * 1024**3,
        "used": 1024**3,
        "util": 5,
        "temp": 40,
        "mw": 70500,
    }
    mod, calls = _fake_nvml([card], fail_power=True)
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    monkeypatch.setenv("PATH", FAKE_PATH)
    monkeypatch.setenv("FAKE_NVIDIA_SMI", str(OUTPUTS / "five_1060.csv"))
    d = discover()
    assert d.source == "nvml" and calls == ["init", "shutdown"]
    (g,) = d.gpus
    assert (g.name, g.memory_total_mib, g.memory_used_mib, g.temperature_c, g.power_w) == (
        "NVIDIA H100",
        81920,
        1024,
        40.0,
        None,
    )
    assert g.uuid == "GPU-0f3a1c2e-0000-0000-0000-000000000000" and g.pci == "0000:04:00.0"
    assert g.unknown == ["power"]


@pytest.mark.posix  # the fake tools are shebang scripts
def test_nvml_without_a_driver_falls_back_to_nvidia_smi(monkeypatch):
    mod, _ = _fake_nvml([], fail_init=True)
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    monkeypatch.setenv("PATH", FAKE_PATH)
    monkeypatch.setenv("FAKE_NVIDIA_SMI", str(OUTPUTS / "five_1060.csv"))
    assert discover().source == "nvidia-smi"


@pytest.mark.posix  # the fake tools are shebang scripts
def test_tool_timeout_is_a_note_not_a_hang(monkeypatch, tmp_path):
    slow = tmp_path / "nvidia-smi"
    slow.write_text("#!/bin/sh\nexec /bin/sleep 30\n")
    slow.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(discovery, "TOOL_TIMEOUT", 0.2)
    d = discover()
    assert d.source == "none" and "did not answer within 0.2s" in d.notes[0]


# --- Vulkan (issue 20) --------------------------------------------------------


def _vulkan_notes(d):
    """The notes about Vulkan (the fake vendor tools, unset, add theirs)."""
    return [n for n in d.notes if "ulkan" in n]


def test_vulkaninfo_of_this_machines_lavapipe_is_one_software_device():
    (d,) = parse_vulkaninfo((OUTPUTS / "vulkaninfo_llvmpipe.txt").read_text())
    assert (d.index, d.kind, d.software, d.driver, d.vendor) == (0, "cpu", True, "llvmpipe", "mesa")
    assert d.name == "llvmpipe (LLVM 15.0.6, 256 bits)"
    assert d.memory_total_bytes == 2 * 1024**3 and d.memory_used_bytes is None  # no budget ext
    assert d.uuid == "6d657361-3232-2e33-2e36-000000000000" and d.pci is None


def test_vulkaninfo_of_two_radv_cards_sums_their_device_local_heaps():
    six8, six6, cpu = parse_vulkaninfo((OUTPUTS / "vulkaninfo_two_radv.txt").read_text())
    assert [d.index for d in (six8, six6, cpu)] == [0, 1, 2]
    assert (six8.name, six8.kind, six8.driver, six8.vendor) == (
        "AMD Radeon RX 6800 (RADV NAVI21)",
        "discrete",
        "radv",
        "amd",
    )
    # the 15.75 GiB heap and the 256 MiB BAR heap are both VRAM; the GTT heap is not
    assert six8.memory_total_bytes == 16 * 1024**3
    assert six8.memory_used_bytes == 970 * 1024**2
    assert (six8.pci, six6.pci) == ("0000:03:00.0", "0000:0a:00.0")
    assert six6.memory_used_bytes == 3 * 1024**3 + 16 * 1024**2
    assert cpu.software and not six8.software


@pytest.mark.parametrize(
    "text, match",
    [
        ("no report at all", "no VULKANINFO header"),
        ("==========\nVULKANINFO\n==========\nGPU0:\n\tdeviceType = X\n", "without a deviceName"),
        (
            "GPU0:\n\tdeviceName = x\nmemoryHeaps: count = 1\n\tmemoryHeaps[0]:\n"
            "\t\tsize   = lots\n\t\t\tMEMORY_HEAP_DEVICE_LOCAL_BIT\n",
            "GPU0 \\(x\\) with values that are not numbers",
        ),
    ],
)
def test_vulkaninfo_garbage_is_a_clear_error(text, match):
    with pytest.raises(VulkanInfoError, match=match):
        parse_vulkaninfo(text)


def test_vulkaninfo_without_devices_is_an_empty_list():
    assert parse_vulkaninfo("==========\nVULKANINFO\n==========\n") == []


@pytest.mark.posix  # the fake tools are shebang scripts
def test_amd_cards_on_vulkan_alone_are_the_rows_software_ones_never(monkeypatch):
    _fake_path(monkeypatch, vulkan="vulkaninfo_two_radv.txt")
    d = discover()
    assert d.source == "vulkaninfo" and not _vulkan_notes(d)
    assert [(g.index, g.backend, g.vulkan_index) for g in d.gpus] == [
        (0, "vulkan", 0),
        (1, "vulkan", 1),
    ]
    assert [x.index for x in d.vulkan] == [0, 1, 2]  # llvmpipe is still there to pin
    assert [x.index for x in d.unlisted] == [2]
    six8 = d.gpus[0]
    assert (six8.memory_total_mib, six8.memory_used_mib, six8.memory_free_mib) == (
        16384,
        970,
        15414,
    )
    assert six8.unknown == ["utilization", "temperature", "power"]
    assert d.devices_of("vulkan") == {
        0: "AMD Radeon RX 6800 (RADV NAVI21)",
        1: "AMD Radeon RX 6600 (RADV NAVI23)",
        2: "llvmpipe (LLVM 15.0.7, 256 bits)",
    }
    assert d.devices_of("cuda") == {} and d.devices_of("sycl") is None


@pytest.mark.posix  # the fake tools are shebang scripts
def test_amdgpu_sysfs_fills_in_what_vulkan_lacks(monkeypatch, tmp_path):
    drm = _sysfs(tmp_path)
    _fake_path(monkeypatch, vulkan="vulkaninfo_two_radv.txt")
    monkeypatch.setattr(discovery, "read_cards", lambda: read_cards(drm))
    d = discover()
    assert d.source == "vulkaninfo + amdgpu sysfs"
    six8, six6 = d.gpus
    assert (six8.temperature_c, six8.utilization_pct, six8.power_w) == (45.0, 7.0, 35.0)
    assert (six8.memory_used_mib, six8.memory_total_mib) == (2048, 16368)  # the driver's own
    assert six6.temperature_c is None and six6.memory_used_mib == 3088  # no sysfs card: Vulkan's


def _sysfs(root):
    """A /sys/class/drm as amdgpu lays it out: card0 an AMD card with readings,
    card1 an NVIDIA one, card0-DP-1 a connector."""
    drm = root / "drm"
    pci = root / "devices"
    for card, addr, vendor in (
        ("card0", "0000:03:00.0", "0x1002"),
        ("card1", "0000:04:00.0", "0x10de"),
    ):
        dev = pci / addr
        (dev / "hwmon" / "hwmon3").mkdir(parents=True)
        (dev / "vendor").write_text(vendor + "\n")
        (drm / card).mkdir(parents=True)
        (drm / card / "device").symlink_to(dev)
    amd = pci / "0000:03:00.0"
    (amd / "mem_info_vram_total").write_text(f"{16368 * 1024**2}\n")
    (amd / "mem_info_vram_used").write_text(f"{2048 * 1024**2}\n")
    (amd / "gpu_busy_percent").write_text("7\n")
    (amd / "hwmon" / "hwmon3" / "temp1_input").write_text("45000\n")
    (amd / "hwmon" / "hwmon3" / "power1_average").write_text("35000000\n")
    (drm / "card0-DP-1").mkdir()
    return drm


def test_amdgpu_sysfs_reads_amd_cards_only_by_pci_address(tmp_path):
    cards = read_cards(_sysfs(tmp_path))
    assert list(cards) == ["0000:03:00.0"]
    assert cards["0000:03:00.0"].temperature_c == 45.0
    assert read_cards(tmp_path / "absent") == {}


@pytest.mark.posix  # the fake tools are shebang scripts
def test_rocm_cards_get_the_vulkan_index_of_the_same_card_by_pci(monkeypatch):
    _fake_path(monkeypatch, rocm="rocm_two.json", vulkan="vulkaninfo_two_radv.txt")
    d = discover()
    assert d.source == "rocm-smi" and not _vulkan_notes(d)
    assert [(g.backend, g.index, g.vulkan_index, g.pci) for g in d.gpus] == [
        ("rocm", 0, 0, "0000:03:00.0"),
        ("rocm", 1, 1, "0000:0a:00.0"),
    ]
    assert d.gpus[0].temperature_c == 52.0  # ROCm's readings stay


@pytest.mark.posix  # the fake tools are shebang scripts
def test_cuda_cards_get_their_vulkan_index_by_uuid_and_an_igpu_is_a_note(monkeypatch):
    # Vulkan counts the Intel iGPU first and the 1060s in another order than CUDA
    _fake_path(monkeypatch, nvidia="five_1060.csv", vulkan="vulkaninfo_1060s_and_igpu.txt")
    d = discover()
    assert d.source == "nvidia-smi" and len(d.gpus) == 5
    assert [g.vulkan_index for g in d.gpus] == [2, 3, 4, 1, 5]
    assert not _vulkan_notes(d)  # an iGPU is nothing to warn about
    assert [x.name for x in d.unlisted] == ["Intel(R) UHD Graphics 770 (ADL-S GT1)"]
    as_vulkan = seen_by(d.gpus, "vulkan")
    assert [(g.index, g.memory_used_mib) for g in as_vulkan] == [
        (2, 412),
        (3, 4012),
        (4, 2),
        (1, 1012),
        (5, 812),
    ]
    assert card_index(d.gpus, "vulkan", 1) == 3 and card_index(d.gpus, "cuda", 1) == 1
    assert card_index(d.gpus, "vulkan", 0) is None  # the iGPU is no row
    assert d.devices_of("vulkan")[0].startswith("Intel")  # but may be pinned


@pytest.mark.posix  # the fake tools are shebang scripts
def test_a_loader_without_a_driver_is_no_vulkan_and_no_warning(monkeypatch):
    _fake_path(monkeypatch)  # the fake vulkaninfo then answers "Found no drivers"
    d = discover()
    assert (d.source, d.gpus, d.vulkan, _vulkan_notes(d)) == ("none", [], [], [])


@pytest.mark.posix  # the fake tools are shebang scripts
def test_windows_amd_vulkan_rows_say_which_readings_are_unknown(monkeypatch):
    _fake_path(monkeypatch, vulkan="vulkaninfo_windows_two_amd.txt")
    d = discover()
    assert [(g.name, g.pci) for g in d.gpus] == [
        ("AMD Radeon RX 6800", None),
        ("AMD Radeon RX 6600", None),
    ]
    assert d.gpus[0].memory_used_mib == 1200  # VK_EXT_memory_budget
    assert d.gpus[1].to_json()["unknown"] == ["utilization", "temperature", "power"]


def test_the_vulkan_cache_asks_once_per_ttl():
    calls = []

    def probe():
        calls.append(1)
        return [], []

    cached = discovery.VulkanCache(ttl=3600, probe=probe)
    assert cached() == cached() == ([], []) and len(calls) == 1
    fresh = discovery.VulkanCache(ttl=0, probe=probe)
    fresh(), fresh()
    assert len(calls) == 3


def test_merge_keeps_a_card_that_vulkan_does_not_list():
    cards = parse_nvidia_smi((OUTPUTS / "one_6gb.csv").read_text())
    rows = merge(cards, [], {})
    assert rows == cards and rows[0].vulkan_index is None
