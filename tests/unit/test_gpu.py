import os
import sys
import types
from pathlib import Path

import pytest

from llama_orchestrator import gpu
from llama_orchestrator.gpu import GpuQueryError, discover, parse_nvidia_smi, parse_rocm_smi

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


def _fake_path(monkeypatch, nvidia=None, rocm=None):
    monkeypatch.setenv("PATH", FAKE_PATH)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # NVML absent
    for var, name in (("FAKE_NVIDIA_SMI", nvidia), ("FAKE_ROCM_SMI", rocm)):
        if name:
            monkeypatch.setenv(var, str(OUTPUTS / name))
        else:
            monkeypatch.delenv(var, raising=False)


def test_discover_prefers_nvidia_smi_then_rocm_smi(monkeypatch):
    _fake_path(monkeypatch, nvidia="five_1060.csv", rocm="rocm_two.json")
    d = discover()
    assert d.source == "nvidia-smi" and len(d.gpus) == 5 and d.notes == []


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

    def power(h):
        if fail_power:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return h["mw"]

    mod.nvmlDeviceGetPowerUsage = power
    return mod, calls


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


def test_nvml_without_a_driver_falls_back_to_nvidia_smi(monkeypatch):
    mod, _ = _fake_nvml([], fail_init=True)
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    monkeypatch.setenv("PATH", FAKE_PATH)
    monkeypatch.setenv("FAKE_NVIDIA_SMI", str(OUTPUTS / "five_1060.csv"))
    assert discover().source == "nvidia-smi"


def test_tool_timeout_is_a_note_not_a_hang(monkeypatch, tmp_path):
    slow = tmp_path / "nvidia-smi"
    slow.write_text("#!/bin/sh\nexec /bin/sleep 30\n")
    slow.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(gpu, "TOOL_TIMEOUT", 0.2)
    d = discover()
    assert d.source == "none" and "did not answer within 0.2s" in d.notes[0]
