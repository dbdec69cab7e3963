import json

import pytest

from llama_orchestrator.config.instance import InstanceConfig
from llama_orchestrator.config.parse import (
    load_config,
    parse_config,
    parse_settings,
    redacted,
    save_config,
)
from llama_orchestrator.errors import ConfigError
from llama_orchestrator.models.catalog import model_file

DESIGN_EXAMPLE = """{
  "name": "gpt-oss",
  "model": {"path": "../../models/gpt-oss-20b-Q4_K_S.gguf", "context_size": 4096, "batch_size": 512, "threads": 16},
  "server": {"host": "127.0.0.1", "port": 8001, "parallel": 4},
  "gpu": {"backend": "vulkan", "device_id": 1, "layers": 30},
  "healthcheck": {"interval": 10, "timeout": 5, "retries": 3},
  "restart_policy": {"enabled": true, "max_retries": 5}
}"""


def problems_of(text: str, name: str = "gpt-oss") -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "f.json", name)
    return [str(p) for p in info.value.problems]


def test_config_design_example_validates_unchanged():
    cfg = parse_config(DESIGN_EXAMPLE, "f.json", "gpt-oss")
    assert cfg.gpu.backend == "vulkan" and cfg.gpu.devices == [1] and cfg.gpu.layers == 30
    assert cfg.model.batch_size == 512 and cfg.server.parallel == 4
    assert cfg.restart_policy.effective_mode == "on-failure"


def test_config_unknown_field_names_field_and_file():
    data = json.loads(DESIGN_EXAMPLE)
    data["server"]["prot"] = 1
    assert problems_of(json.dumps(data)) == [
        "f.json: server.prot: unknown field; remove it or fix its spelling"
    ]


def test_config_invalid_json_reports_line_and_column():
    (msg,) = problems_of('{\n  "model": {,\n}')
    assert msg.startswith("f.json: invalid JSON at line 2, column 13")


def test_config_every_problem_is_reported_at_once():
    msgs = problems_of(
        '{"model": {"path": "m.gguf", "threads": 0}, "server": {"port": 70000}, "x": 1}'
    )
    assert len(msgs) == 3
    assert any("model.threads" in m for m in msgs)
    assert any("server.port" in m for m in msgs)
    assert any(m.startswith("f.json: x: unknown field") for m in msgs)


def test_a_host_list_is_refused_for_an_instance_and_taken_by_the_router():
    (msg,) = problems_of(
        '{"model": {"path": "m.gguf"}, "server": {"port": 8001, "host": "127.0.0.1,::1"}}'
    )
    assert msg.startswith("f.json: server.host: give one address or host name")
    assert "Value error" not in msg
    from llama_orchestrator.config.settings import RouterSettings

    assert RouterSettings(host="127.0.0.1, ::1").hosts() == ["127.0.0.1", "::1"]
    assert RouterSettings(host="[::1]").hosts() == ["::1"]
    with pytest.raises(ValueError, match="comma-separated"):
        RouterSettings(host="127.0.0.1,")


def test_config_unknown_backend_lists_the_known_ones():
    data = json.loads(DESIGN_EXAMPLE)
    data["gpu"]["backend"] = "opencl"
    (msg,) = problems_of(json.dumps(data))
    assert "gpu.backend: unknown backend 'opencl'; use one of cpu, cuda, rocm, vulkan" in msg


def test_config_device_list_and_bad_devices():
    base = json.loads(DESIGN_EXAMPLE)
    base["gpu"]["device_id"] = [0, 3]
    assert parse_config(json.dumps(base), "f", "gpt-oss").gpu.devices == [0, 3]
    base["gpu"]["device_id"] = [0, 0]
    assert "appears twice" in problems_of(json.dumps(base))[0]
    base["gpu"]["device_id"] = -1
    assert "0 or more" in problems_of(json.dumps(base))[0]


def test_config_name_must_match_folder():
    (msg,) = problems_of(DESIGN_EXAMPLE, name="other")
    assert "differs from the folder name 'other'" in msg


def test_config_not_an_object():
    assert "must be a JSON object" in problems_of("[1, 2]")[0]


@pytest.mark.parametrize(
    ("policy", "mode"),
    [
        ({"enabled": False}, "no"),
        ({}, "on-failure"),
        ({"enabled": False, "mode": "always"}, "always"),
        ({"mode": "unless-stopped"}, "unless-stopped"),
    ],
)
def test_config_restart_mode_from_original_and_new_format(policy, mode):
    data = {"model": {"path": "m"}, "server": {"port": 1}, "restart_policy": policy}
    assert parse_config(json.dumps(data), "f", "x").restart_policy.effective_mode == mode


def test_config_relative_model_path_resolves_against_config_folder(tmp_path):
    cfg = parse_config(DESIGN_EXAMPLE, "f", "gpt-oss")
    folder = tmp_path / "instances" / "gpt-oss"
    assert model_file(cfg.model.path, folder) == tmp_path / "models" / "gpt-oss-20b-Q4_K_S.gguf"


def test_config_save_is_atomic_and_round_trips(tmp_path):
    cfg = parse_config(DESIGN_EXAMPLE, "f", "gpt-oss")
    path = tmp_path / "gpt-oss" / "config.json"
    save_config(path, cfg)
    assert load_config(path) == cfg
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]  # no temp file left


def test_config_redacted_hides_api_key_and_secret_env():
    data = json.loads(DESIGN_EXAMPLE)
    data["server"]["api_key"] = "sk-123"
    data["env"] = {"HF_TOKEN": "abc", "OMP_NUM_THREADS": "4"}
    shown = redacted(InstanceConfig.model_validate(data))
    assert "sk-123" not in json.dumps(shown) and "abc" not in json.dumps(shown)
    assert shown["env"]["OMP_NUM_THREADS"] == "4"


def test_settings_defaults_and_unknown_field():
    s = parse_settings("{}", "llama-orch.json")
    assert s.router.port == 8080 and s.logs.backups == 3 and s.gpu.temp_threshold == 85
    with pytest.raises(ConfigError, match="router.prot"):
        parse_settings('{"router": {"prot": 1}}', "llama-orch.json")


def test_schema_has_field_descriptions():
    schema = InstanceConfig.model_json_schema()
    props = schema["$defs"]["ServerSection"]["properties"]
    assert "never argv" in props["api_key"]["description"]


def test_device_id_auto_is_chosen_at_start():
    data = json.loads(DESIGN_EXAMPLE)
    data["gpu"]["device_id"] = "auto"
    g = parse_config(json.dumps(data), "f", "gpt-oss").gpu
    assert g.auto and g.devices == []
    data["gpu"]["device_id"] = "best"
    assert "gpu.device_id" in problems_of(json.dumps(data))[0]
