"""What a llama-server build drives (gpus.builds): its own `--list-devices`
output and the ggml libraries beside it, remembered per binary version."""

import os
import sys
from pathlib import Path

import pytest

from llama_orchestrator.gpus import builds
from llama_orchestrator.gpus.builds import Build, from_files, from_listing

CPU = "Available devices:\n  (none)\n"
H100 = "Available devices:\n  CUDA0: NVIDIA H100 80GB HBM3 (81079 MiB, 80484 MiB free)\n"


def test_a_cpu_build_lists_no_device_and_has_no_backend():
    assert from_listing(CPU, "") == (frozenset(), ())


@pytest.mark.parametrize(
    ("stdout", "stderr", "backends"),
    [
        (H100, "", {"cuda"}),
        (
            "Available devices:\n  ROCm0: AMD Radeon RX 7900 XTX (24560 MiB, 24000 MiB free)\n",
            "",
            {"rocm"},
        ),
        (
            "Available devices:\n  Vulkan0: llvmpipe (LLVM 15.0.6, 256 bits) (2048 MiB, 2048 MiB free)\n",
            "",
            {"vulkan"},
        ),
        ("Available devices:\n  MTL0: Apple M2 Max (49152 MiB, 49152 MiB free)\n", "", {"metal"}),
        (
            "Available devices:\n  SYCL0: Intel(R) Arc(TM) A770 (16225 MiB, 16225 MiB free)\n",
            "",
            {"sycl"},
        ),
        (
            "Available devices:\n  CUDA0: RTX 3060 (12288 MiB, 12000 MiB free)\n"
            "  Vulkan0: RTX 3060 (12288 MiB, 12000 MiB free)\n",
            "",
            {"cuda", "vulkan"},
        ),
        # a backend that loads but sees no device still says it is there
        (CPU, "load_backend: loaded CUDA backend from /opt/llama/libggml-cuda.so\n", {"cuda"}),
        (
            CPU,
            "ggml_cuda_init: failed to initialize CUDA: no CUDA-capable device is detected\n",
            {"cuda"},
        ),
        (CPU, "ggml_cuda_init: found 1 ROCm devices:\n", {"rocm"}),
    ],
)
def test_each_backend_is_read_from_the_builds_own_words(stdout, stderr, backends):
    read = from_listing(stdout, stderr)
    assert read is not None and read[0] == backends


def test_output_that_is_not_llama_servers_gives_no_verdict():
    assert from_listing("usage: fake-server [--port N]\n", "") is None
    assert not Build("x", frozenset(), known=False).lacks("cuda")
    assert Build("x", frozenset(), known=False).label().startswith("unknown")


def test_the_libraries_beside_the_binary_name_its_backends():
    names = ["libggml-base.so", "libggml-cpu.so", "libggml-vulkan.so.0.20.0", "libvulkan.so.1"]
    assert from_files(names) == {"vulkan"}
    assert from_files(["ggml-cuda.dll", "ggml-base.dll", "llama-server.exe"]) == {"cuda"}
    assert from_files(["libggml-hip.so", "libggml-metal.dylib"]) == {"rocm", "metal"}
    assert from_files(["libggml-cpu.so", "libggml-cudart-notes.txt"]) == frozenset()


def test_lacks_is_a_verdict_only_for_gpu_backends_of_a_known_build():
    cpu = Build("/b/llama-server", frozenset(), known=True)
    assert cpu.lacks("cuda") and cpu.lacks("vulkan") and not cpu.lacks("cpu")
    assert cpu.label() == "cpu only"
    both = Build("/b/llama-server", frozenset({"vulkan", "cuda"}), known=True)
    assert not both.lacks("cuda") and both.lacks("rocm") and both.label() == "cuda, vulkan"


@pytest.mark.skipif(sys.platform == "win32", reason="a shell script stands for the binary")
def test_a_probe_is_remembered_per_path_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setattr(builds, "_SEEN", {})
    exe = tmp_path / "llama-server"
    calls = tmp_path / "calls"
    exe.write_text(f"#!/bin/sh\necho run >> {calls}\nprintf '{H100}'\n")
    exe.chmod(0o755)
    cache = tmp_path / "state" / "builds.json"
    cache.parent.mkdir()
    assert builds.probe(exe, cache).backends == {"cuda"}
    assert builds.probe(exe, cache).backends == {"cuda"}  # remembered in this process
    monkeypatch.setattr(builds, "_SEEN", {})
    assert builds.probe(exe, cache).backends == {"cuda"}  # and in the file for the next
    assert calls.read_text().count("run") == 1
    # a new build at the same path (another size and mtime) is read again
    exe.write_text(f"#!/bin/sh\necho run >> {calls}\nprintf '{CPU}'   \n")
    stat = exe.stat()
    os.utime(exe, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    monkeypatch.setattr(builds, "_SEEN", {})
    assert builds.probe(exe, cache).lacks("cuda")
    assert calls.read_text().count("run") == 2


@pytest.mark.skipif(sys.platform == "win32", reason="a shell script stands for the binary")
def test_the_probe_sees_every_card_whatever_the_daemon_was_pinned_to(tmp_path, monkeypatch):
    monkeypatch.setattr(builds, "_SEEN", {})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    exe = tmp_path / "llama-server"
    # answers as a CUDA build does: no device when CUDA_VISIBLE_DEVICES hides them all
    exe.write_text(
        '#!/bin/sh\nif [ "${CUDA_VISIBLE_DEVICES-unset}" = "" ]; then printf '
        f"'{CPU}'; else printf '{H100}'; fi\n"
    )
    exe.chmod(0o755)
    assert builds.probe(exe, None).backends == {"cuda"}


def test_a_binary_that_cannot_run_gives_no_verdict(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(builds, "_SEEN", {})
    exe = tmp_path / "llama-server"
    exe.write_bytes(b"\x7fELF not really")
    exe.chmod(0o755)
    (tmp_path / "libggml-vulkan.so").touch()
    build = builds.probe(exe, None)
    assert not build.known and build.backends == {"vulkan"} and not build.lacks("cuda")
