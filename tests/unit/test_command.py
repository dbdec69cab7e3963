from pathlib import Path

import pytest

from llama_orchestrator.config.command import build_launch, check_extra_args
from llama_orchestrator.config.instance import InstanceConfig

BIN = Path("/opt/llama-server")
MODEL = Path("/models/m.gguf")


def cfg(**gpu):
    return InstanceConfig.model_validate(
        {
            "model": {"path": "m.gguf", "context_size": 2048, "batch_size": 256, "threads": 8},
            "server": {
                "port": 8001,
                "parallel": 4,
                "api_key": "sk-secret",
                "extra_args": ["--jinja"],
            },
            "gpu": gpu or {"backend": "cpu"},
            "env": {"OMP_NUM_THREADS": "8"},
        }
    )


def test_argv_has_every_flag_in_order_and_extra_args_last():
    launch = build_launch(cfg(), "gpt", BIN, MODEL, {})
    assert launch.argv == [
        "/opt/llama-server",
        "-m",
        "/models/m.gguf",
        "--host",
        "127.0.0.1",
        "--port",
        "8001",
        "-c",
        "2048",
        "-b",
        "256",
        "-t",
        "8",
        "-np",
        "4",
        "-ngl",
        "0",
        "--device",
        "none",
        "--alias",
        "gpt",
        "--metrics",
        "--jinja",
    ]


def test_api_key_goes_to_env_never_argv():
    launch = build_launch(cfg(), "gpt", BIN, MODEL, {})
    assert not any("sk-secret" in a for a in launch.argv)
    assert launch.env["LLAMA_API_KEY"] == "sk-secret"


@pytest.mark.parametrize(
    ("backend", "var", "value"),
    [
        ("cuda", "CUDA_VISIBLE_DEVICES", "0,3"),
        ("rocm", "HIP_VISIBLE_DEVICES", "0,3"),
        ("vulkan", "GGML_VK_VISIBLE_DEVICES", "0,3"),
        ("sycl", "ONEAPI_DEVICE_SELECTOR", "level_zero:0,3"),
    ],
)
def test_gpu_pinning_by_backend_with_a_device_list(backend, var, value):
    launch = build_launch(cfg(backend=backend, device_id=[0, 3], layers=99), "g", BIN, MODEL, {})
    assert launch.env[var] == value
    assert launch.argv[launch.argv.index("-ngl") + 1] == "99"


def test_cuda_pinning_counts_cards_in_pci_order_like_nvidia_smi():
    launch = build_launch(cfg(backend="cuda", device_id=1), "g", BIN, MODEL, {})
    assert launch.env["CUDA_VISIBLE_DEVICES"] == "1"
    assert launch.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_cpu_backend_offloads_nothing_and_hides_the_cards():
    launch = build_launch(cfg(backend="cpu", device_id=2, layers=30), "g", BIN, MODEL, {})
    assert launch.argv[launch.argv.index("-ngl") + 1] == "0"
    assert launch.argv[launch.argv.index("--device") + 1] == "none"
    # a CUDA build of llama-server otherwise opens a context on every card it sees
    assert launch.env["CUDA_VISIBLE_DEVICES"] == ""
    assert "GGML_VK_VISIBLE_DEVICES" not in launch.env


def test_cpu_backend_leaves_an_explicit_device_choice_alone():
    c = cfg(backend="cpu")
    c.server.extra_args = ["--device", "CPU"]
    c.env = {"CUDA_VISIBLE_DEVICES": "1"}
    launch = build_launch(c, "g", BIN, MODEL, {})
    assert launch.argv.count("--device") == 1
    assert launch.env["CUDA_VISIBLE_DEVICES"] == "1"


def test_gpu_without_layers_leaves_ngl_to_llama_server_and_minus_one_means_all():
    assert "-ngl" not in build_launch(cfg(backend="cuda"), "g", BIN, MODEL, {}).argv
    argv = build_launch(cfg(backend="cuda", layers=-1), "g", BIN, MODEL, {}).argv
    assert argv[argv.index("-ngl") + 1] == "all"


def test_split_flags_follow_the_config():
    argv = build_launch(
        cfg(backend="cuda", device_id=[0, 3], split_mode="row", tensor_split=[3, 1.5]),
        "g",
        BIN,
        MODEL,
        {},
    ).argv
    assert argv[argv.index("-sm") + 1] == "row"
    assert argv[argv.index("-ts") + 1] == "3,1.5"


def test_env_merges_base_config_and_markers():
    launch = build_launch(
        cfg(), "gpt", BIN, MODEL, {"PATH": "/bin", "OMP_NUM_THREADS": "1"}, Path("/h")
    )
    assert launch.env["PATH"] == "/bin"
    assert launch.env["OMP_NUM_THREADS"] == "8"  # the config wins over the base environment
    assert launch.env["LLAMA_ORCH_INSTANCE"] == "gpt" and launch.env["LLAMA_ORCH_HOME"] == "/h"
    assert "PATH" not in launch.added_env


def test_alias_defaults_to_name():
    c = cfg()
    c.model.alias = "gpt-oss-20b"
    argv = build_launch(c, "gpt", BIN, MODEL, {}).argv
    assert argv[argv.index("--alias") + 1] == "gpt-oss-20b"


def test_extra_args_that_fight_managed_flags_are_errors():
    errors, _ = check_extra_args(["--port", "9000", "--api-key=x", "--jinja"])
    assert len(errors) == 2 and "server.port" in errors[0] and "server.api_key" in errors[1]


@pytest.mark.parametrize("args", [["--host", "0.0.0.0"], ["--host=0.0.0.0"]])
def test_extra_args_opening_the_network_warn(args):
    _, warnings = check_extra_args(args)
    assert warnings == ["--host 0.0.0.0 opens the server to the network"]


def test_several_flags_in_one_item_are_refused():
    """Issue 40: `init m -- "--jinja --flash-attn on"` passed init and validate,
    then llama-server refused it at every one of five restarts."""
    errors, _ = check_extra_args(["--jinja --flash-attn on"])
    assert errors == [
        "'--jinja --flash-attn on' is one argument holding several; give each flag and "
        "value as its own item: ['--jinja', '--flash-attn', 'on']"
    ]
    ok = ["--chat-template={% if x %}{{ y }}{% endif %}", "--system-prompt", "be brief, please"]
    assert check_extra_args(ok) == ([], [])
