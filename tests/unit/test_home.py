from pathlib import Path

import pytest

from llama_orchestrator.errors import UserError
from llama_orchestrator.home import check_name, resolve_home


def test_home_resolution_order(tmp_path, monkeypatch):
    project = tmp_path / "proj"
    (project / "instances").mkdir(parents=True)
    deep = project / "a" / "b"
    deep.mkdir(parents=True)
    assert resolve_home(None, cwd=deep).root == project  # nearest ancestor with instances/
    monkeypatch.setenv("LLAMA_ORCH_HOME", str(tmp_path / "env"))
    assert resolve_home(None, cwd=deep).root == tmp_path / "env"
    assert resolve_home(tmp_path / "flag", cwd=deep).root == tmp_path / "flag"


def test_home_falls_back_to_user_data_dir(tmp_path):
    root = resolve_home(None, cwd=tmp_path).root
    assert root.name == "llama-orch" and str(tmp_path / "xdg-data") in str(root)


@pytest.mark.parametrize("bad", ["../evil", "Evil", "", "-x", "a/b", "..", "a" * 64, "a..b"])
def test_invalid_names_are_refused(bad):
    with pytest.raises(UserError, match="not a valid instance name"):
        check_name(bad)


@pytest.mark.parametrize("good", ["gpt-oss", "qwen2.5-7b", "a", "w_1"])
def test_valid_names(good):
    assert check_name(good) == good


def test_instance_names_lists_only_folders_with_config(tmp_path):
    from llama_orchestrator.home import Home

    home = Home(tmp_path)
    (tmp_path / "instances" / "a").mkdir(parents=True)
    (tmp_path / "instances" / "a" / "config.json").write_text("{}")
    (tmp_path / "instances" / "empty").mkdir()
    assert home.instance_names() == ["a"]
    assert Home(Path(tmp_path / "none")).instance_names() == []
