"""gpus, models, VRAM fit and card alerts through the CLI, with recorded
nvidia-smi / rocm-smi outputs replayed by fake tools on PATH."""

import json
import os
from pathlib import Path

import pytest

from tests.helpers import gpu_build, run_cli, write_config

pytestmark = pytest.mark.integration

FAKES = Path(__file__).parents[1] / "fakes"


def gpu_env(nvidia=None, rocm=None, vulkan=None, **extra):
    env = {
        "PATH": f"{FAKES / 'gpu_bin'}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(FAKES / "no_nvml"),  # NVML absent whatever is installed
        "FAKE_NVIDIA_SMI": str(FAKES / "gpu_outputs" / nvidia) if nvidia else "",
        "FAKE_ROCM_SMI": str(FAKES / "gpu_outputs" / rocm) if rocm else "",
        # unset, the fake answers as a Vulkan loader without a driver does
        "FAKE_VULKANINFO": str(FAKES / "gpu_outputs" / vulkan) if vulkan else "",
        # and a llama-server built for those cards (`init` names no binary)
        "LLAMA_SERVER_BIN": str(gpu_build()),
    }
    return {**env, **extra}


def test_gpus_lists_cards_with_pinned_instances(home, tiny_model):
    write_config(home, "big", tiny_model, gpu={"backend": "cuda", "device_id": [0, 3]})
    write_config(home, "w1", tiny_model, gpu={"backend": "cuda", "device_id": 1})
    r = run_cli(home, "gpus", "--json", env=gpu_env("five_1060.csv"))
    assert r.returncode == 0, r.stderr
    gpus = json.loads(r.stdout)
    assert len(gpus) == 5
    keys = {
        "index",
        "name",
        "backend",
        "memory_total_mib",
        "memory_used_mib",
        "utilization_pct",
        "temperature_c",
        "power_w",
        "instances",
    }
    assert keys <= set(gpus[0])
    assert [g["instances"] for g in gpus] == [["big"], ["w1"], [], ["big"], []]
    table = run_cli(home, "gpus", env=gpu_env("five_1060.csv"))
    assert "GTX 1060" in table.stdout and "4012/6144 MiB" in table.stdout


def test_gpus_from_rocm_smi_and_with_none(home):
    r = run_cli(home, "gpus", "--json", env=gpu_env(rocm="rocm_two.json"))
    assert [g["backend"] for g in json.loads(r.stdout)] == ["rocm", "rocm"]
    r = run_cli(
        home,
        "gpus",
        env={"PATH": str(Path(os.sys.executable).parent), "PYTHONPATH": str(FAKES / "no_nvml")},
    )
    lines = r.stdout.splitlines()
    assert r.returncode == 0
    assert lines[0] == "no GPU found (looked for NVML, nvidia-smi, rocm-smi and vulkaninfo)"
    # and the llama-server this home would run (no instance yet: the lookup's)
    assert len(lines) == 2 and lines[1].startswith("llama-server ")
    assert lines[1].endswith("(cpu only)")
    assert r.stderr == ""


def test_gpus_of_two_amd_cards_on_vulkan_alone_says_what_is_unknown(home, tiny_model):
    write_config(home, "big", tiny_model, gpu={"backend": "vulkan", "device_id": 1})
    env = gpu_env(vulkan="vulkaninfo_windows_two_amd.txt")
    r = run_cli(home, "gpus", "--json", env=env)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(g["index"], g["backend"], g["instances"]) for g in rows] == [
        (0, "vulkan", []),
        (1, "vulkan", ["big"]),
    ]
    assert rows[0]["memory_used_mib"] == 1200 and rows[0]["temperature_c"] is None
    assert rows[0]["unknown"] == ["utilization", "temperature", "power"]
    table = run_cli(home, "gpus", env={**env, "COLUMNS": "120"})
    assert "RX 6800" in table.stdout and "1200/16384 MiB" in table.stdout
    assert "GPU 0: vulkaninfo reports no utilization, temperature, power for it" in table.stdout
    assert "0/0" not in table.stdout and "0°C" not in table.stdout


def test_gpus_shows_each_cards_vulkan_index_and_a_software_device_apart(home, tiny_model):
    write_config(home, "cu", tiny_model, gpu={"backend": "cuda", "device_id": 0})
    write_config(home, "vk", tiny_model, gpu={"backend": "vulkan", "device_id": 2})
    env = gpu_env("five_1060.csv", vulkan="vulkaninfo_1060s_and_igpu.txt")
    rows = json.loads(run_cli(home, "gpus", "--json", env=env).stdout)
    assert [g["vulkan_index"] for g in rows] == [2, 3, 4, 1, 5]
    # Vulkan's device 2 is CUDA's card 0: both instances are on that card
    assert [sorted(g["instances"]) for g in rows] == [["cu", "vk"], [], [], [], []]
    r = run_cli(home, "gpus", env={**env, "COLUMNS": "120"})
    assert "cuda (vk 2)" in r.stdout
    assert (
        "Vulkan device 0 is Intel(R) UHD Graphics 770 (ADL-S GT1), not a card nvidia-smi "
        "reports, so not listed; backend vulkan with device_id 0 runs on it"
    ) in r.stdout
    assert "warning" not in r.stderr  # an iGPU is nothing to warn about
    r = run_cli(home, "gpus", env=gpu_env(vulkan="vulkaninfo_llvmpipe.txt"))
    assert r.returncode == 0 and r.stdout.splitlines()[:2] == [
        "no GPU found (looked for NVML, nvidia-smi, rocm-smi and vulkaninfo)",
        "Vulkan device 0 is llvmpipe (LLVM 15.0.6, 256 bits), a software renderer on the CPU, so "
        "not listed as a GPU; backend vulkan with device_id 0 runs on it (for tests)",
    ]
    # then the builds the instances run, each with what it was built for
    assert f"llama-server {gpu_build('vulkan')} (vulkan); runs vk" in r.stdout


def test_vulkan_pins_are_checked_and_fitted_with_vulkans_figures(home, tiny_model):
    env = gpu_env(vulkan="vulkaninfo_two_radv.txt")
    write_config(home, "a", tiny_model, gpu={"backend": "vulkan", "device_id": 1, "vram_mib": 4608})
    write_config(home, "b", tiny_model, gpu={"backend": "vulkan", "device_id": 1, "vram_mib": 4608})
    r = run_cli(home, "config", "validate", env=env)
    assert r.returncode == 0, r.stderr
    assert "GPU 1 (AMD Radeon RX 6600 (RADV NAVI23), 8.0 GB) cannot hold a (4.5 GB)" in r.stderr
    write_config(home, "b", tiny_model, gpu={"backend": "vulkan", "device_id": 5})
    r = run_cli(home, "up", "b", env=env)
    assert r.returncode == 2 and "GPU 5 is not on this machine, which has vulkan GPU 0" in r.stderr
    assert "Traceback" not in r.stderr
    rows = {x["name"]: x for x in json.loads(run_cli(home, "ps", "--json").stdout)}
    assert rows["b"]["pid"] is None
    r = run_cli(
        home,
        "init",
        "c",
        "--model",
        str(tiny_model),
        "--backend",
        "vulkan",
        "--gpu",
        "auto",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(home.config_path("c").read_text())["gpu"]["device_id"] == 0


def test_garbage_from_a_tool_is_a_warning_not_a_crash(home):
    r = run_cli(home, "gpus", env=gpu_env("garbage.txt"))
    assert r.returncode == 0 and "no GPU found" in r.stdout
    assert "warning: nvidia-smi line 1" in r.stderr and "Traceback" not in r.stderr


def test_vram_overcommit_is_a_warning_and_an_error_with_strict(home, kv_heavy_model):
    # each needs ~3.1 GB on GPU 1 (a 6 GB card): together they do not fit
    for name in ("a", "b"):
        write_config(
            home,
            name,
            kv_heavy_model,
            model={"context_size": 1_500_000},
            gpu={"backend": "cuda", "device_id": 1},
        )
    env = gpu_env("five_1060.csv")
    r = run_cli(home, "config", "validate", env=env)
    assert r.returncode == 0, r.stderr
    assert (
        "warning:" in r.stderr
        and "GPU 1 (NVIDIA GeForce GTX 1060 6GB, 6.0 GB) cannot hold a (3.1 GB) + b (3.1 GB)"
        in r.stderr
    )
    r = run_cli(home, "config", "validate", "--strict", env=env)
    assert r.returncode == 2 and "cannot hold a (3.1 GB) + b (3.1 GB)" in r.stderr
    r = run_cli(home, "up", "a", "b", "--strict", env=env)
    assert r.returncode == 2 and "cannot hold" in r.stderr
    assert all(row["pid"] is None for row in json.loads(run_cli(home, "ps", "--json").stdout))


def test_up_warns_about_overcommit_with_what_already_runs(home, kv_heavy_model, tiny_model):
    env = gpu_env("five_1060.csv")
    write_config(
        home, "a", tiny_model, model={"context_size": 512}, gpu={"backend": "cuda", "device_id": 2}
    )
    # b's estimate alone is over GPU 2's 6 GB (KV cache of 3.5M tokens)
    write_config(
        home,
        "b",
        kv_heavy_model,
        model={"context_size": 3_500_000},
        gpu={"backend": "cuda", "device_id": 2},
    )
    r = run_cli(home, "config", "validate", "b", env=env)
    assert "cannot hold" in r.stderr and r.returncode == 0
    try:
        r = run_cli(home, "up", "a", env=env)  # a alone fits: no warning
        assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    finally:
        run_cli(home, "down", "--all")


def test_init_gpu_auto_and_defaults_from_the_model(home, kv_heavy_model, tiny_model):
    env = gpu_env("five_1060.csv")

    def init_auto(name, ctx):
        return run_cli(
            home,
            "init",
            name,
            "--model",
            str(kv_heavy_model),
            "--backend",
            "cuda",
            "--gpu",
            "auto",
            "--ctx",
            str(ctx),
            env=env,
        )

    r = init_auto("auto1", 1_500_000)
    assert r.returncode == 0, r.stderr
    cfg = json.loads(home.config_path("auto1").read_text())
    assert (
        cfg["gpu"]["device_id"] == 2 and cfg["gpu"]["layers"] == -1
    )  # the emptiest card; all fits
    assert "--gpu auto chose GPU 2" in r.stdout
    init_auto("auto2", 4_000_000)
    assert json.loads(home.config_path("auto2").read_text())["gpu"]["device_id"] == [0, 2]
    run_cli(home, "init", "plain", "--model", str(tiny_model), env=env)
    assert (
        json.loads(home.config_path("plain").read_text())["model"]["context_size"] == 2048
    )  # model's < 4096
    r = init_auto("nope", 40_000_000)
    assert r.returncode == 2 and "all GPUs together have" in r.stderr
    assert not home.config_path("nope").exists()


def test_ps_warns_about_a_hot_card_and_records_it_once(home, tiny_model):
    write_config(home, "qwen", tiny_model, gpu={"backend": "cuda", "device_id": 1})
    hot = gpu_env("one_hot.csv")
    for _ in range(2):
        r = run_cli(home, "ps", env=hot)
        assert r.returncode == 0 and "GPU 1 (NVIDIA GeForce GTX 1060 6GB) is at 90 °C" in r.stderr
    r = run_cli(home, "ps", env=gpu_env("five_1060.csv"))
    assert "warning" not in r.stderr
    kinds = [json.loads(x)["kind"] for x in run_cli(home, "events", "--json").stdout.splitlines()]
    assert kinds == ["gpu_hot", "gpu_ok"]


def test_ps_warns_about_a_missing_card(home, tiny_model):
    write_config(home, "big", tiny_model, gpu={"backend": "cuda", "device_id": [0, 3]})
    assert "no longer reported" not in run_cli(home, "ps", env=gpu_env("five_1060.csv")).stderr
    r = run_cli(home, "ps", env=gpu_env("card3_missing.csv"))  # card 3 was seen, now gone
    assert "GPU 3 is pinned by big but no longer reported" in r.stderr


def test_a_pin_without_any_gpu_is_refused_and_never_said_to_have_fallen_off(home, tiny_model):
    none = gpu_env()  # no NVML, no nvidia-smi, no rocm-smi output
    r = run_cli(
        home, "init", "g", "--model", str(tiny_model), "--backend", "cuda", "--gpu", "0", env=none
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "GPU 0 is pinned but no GPU was found here" in r.stderr and "--force" in r.stderr
    assert not home.instance_dir("g").exists()
    write_config(home, "g", tiny_model, gpu={"backend": "cuda", "device_id": 0})
    r = run_cli(home, "up", "g", "--no-daemon", env=none)
    assert r.returncode == 2 and "set gpu.force: true to pin anyway" in r.stderr
    for _ in range(2):
        r = run_cli(home, "ps", env=none)
        assert r.returncode == 0 and "fell off the bus" not in r.stderr
    r = run_cli(
        home,
        "init",
        "g",
        "--model",
        str(tiny_model),
        "--backend",
        "cuda",
        "--gpu",
        "0",
        "--force",
        env=none,
    )
    assert r.returncode == 0 and "gpu.force set" in r.stdout
    assert json.loads(home.config_path("g").read_text())["gpu"]["force"] is True


def test_describe_shows_model_and_live_gpu_of_a_running_pinned_instance(home, tiny_model):
    env = gpu_env("five_1060.csv")
    write_config(home, "w1", tiny_model, gpu={"backend": "cuda", "device_id": 1, "layers": 99})
    try:
        assert run_cli(home, "up", "w1", env=env).returncode == 0
        d = json.loads(run_cli(home, "describe", "w1", "--json", env=env).stdout)
        assert d["model"]["architecture"] == "llama" and d["model"]["parameters"] == 35168
        assert d["gpus"][0]["index"] == 1 and d["gpus"][0]["temperature_c"] == 68
        assert d["env"]["CUDA_VISIBLE_DEVICES"] == "1"
        text = run_cli(home, "describe", "w1", env=env).stdout
        assert "gpu 1" in text and "4012/6144 MiB" in text
    finally:
        run_cli(home, "down", "w1")


def test_models_list_and_inspect(home, tiny_model, tmp_path):
    models = home.root / "models"
    models.mkdir()
    (models / "tiny.gguf").write_bytes(tiny_model.read_bytes())
    (models / "broken.gguf").write_bytes(tiny_model.read_bytes()[:100])
    r = run_cli(home, "models", "list", "--json")
    rows = {Path(x["path"]).name: x for x in json.loads(r.stdout)}
    assert rows["tiny.gguf"]["parameters"] == 35168 and "truncated" in rows["broken.gguf"]["error"]
    r = run_cli(home, "models", "inspect", str(tiny_model), "--json", "--ctx", "512")
    data = json.loads(r.stdout)
    assert {
        "path",
        "architecture",
        "parameters",
        "file_type",
        "context_length",
        "layers",
        "embedding_length",
        "size_bytes",
    } <= set(data)
    assert data["estimate"]["kv_gpu_bytes"] == 65536
    r = run_cli(home, "models", "inspect", str(models / "broken.gguf"))
    assert r.returncode == 2 and "is truncated" in r.stderr and "Traceback" not in r.stderr


def test_device_id_auto_is_resolved_at_each_up(home, tiny_model):
    write_config(home, "w", tiny_model, gpu={"backend": "cuda", "device_id": "auto", "layers": 99})
    try:
        r = run_cli(home, "up", "w", env=gpu_env("five_1060.csv"))
        assert r.returncode == 0, r.stderr
        assert "w: device_id auto chose GPU 2 (most free VRAM)" in r.stdout
        row = json.loads(run_cli(home, "ps", "--json").stdout)[0]
        assert row["gpu_devices"] == [2]
        import psutil

        assert psutil.Process(row["pid"]).environ()["CUDA_VISIBLE_DEVICES"] == "2"
        gpus = json.loads(run_cli(home, "gpus", "--json", env=gpu_env("five_1060.csv")).stdout)
        assert [g["instances"] for g in gpus] == [[], [], ["w"], [], []]  # where auto put it
        run_cli(home, "down", "w")
        assert json.loads(run_cli(home, "ps", "--json").stdout)[0]["gpu_devices"] == []
        # no GPU anywhere: a clear refusal (--no-daemon: the daemon that the first
        # `up` started sees the GPUs of its own environment, not of this command)
        r = run_cli(home, "up", "w", "--no-daemon", env=gpu_env())
        assert r.returncode == 2 and "--gpu auto found no GPU" in r.stderr
    finally:
        run_cli(home, "down", "--all")


def test_pinning_a_card_the_machine_does_not_have_is_refused(home, tiny_model):
    # CUDA_VISIBLE_DEVICES=7 on a machine without card 7 hides every card: a
    # CUDA llama-server then runs on the CPU and answers /health as if all
    # were well (seen on a real H100). Refuse before starting anything.
    write_config(home, "a", tiny_model, gpu={"backend": "cuda", "device_id": [2, 7]})
    env = gpu_env("five_1060.csv")
    r = run_cli(home, "up", "a", env=env)
    assert r.returncode == 2, r.stderr
    assert "gpu.device_id: GPU 7 is not on this machine" in r.stderr
    assert "0 (NVIDIA GeForce GTX 1060 6GB)" in r.stderr and "Traceback" not in r.stderr
    assert json.loads(run_cli(home, "ps", "--json").stdout)[0]["pid"] is None
    r = run_cli(home, "config", "validate", env=env)
    assert r.returncode == 2 and "GPU 7 is not on this machine" in r.stderr
    # with no GPU found at all the pin is refused too, unless the config forces it
    r = run_cli(home, "config", "validate", env=gpu_env())
    assert r.returncode == 2 and "GPU 2, 7 is pinned but no GPU was found here" in r.stderr
    write_config(home, "a", tiny_model, gpu={"backend": "cuda", "device_id": [2, 7], "force": True})
    r = run_cli(home, "config", "validate", env=gpu_env())
    assert r.returncode == 0, r.stderr


def test_cpu_instances_oversubscribing_the_cores_get_a_warning(home, tiny_model):
    cores = os.cpu_count() or 1
    write_config(home, "a", tiny_model, model={"threads": cores})
    write_config(home, "b", tiny_model, model={"threads": 1})
    r = run_cli(home, "config", "validate")
    assert r.returncode == 0, r.stderr
    assert f"ask for {cores + 1} threads on {cores} cores" in r.stderr
    assert "b/config.json: model.threads:" in r.stderr
    write_config(home, "a", tiny_model, model={"threads": max(1, cores - 1)})
    r = run_cli(home, "config", "validate")
    assert "threads" not in r.stderr or cores == 1
