"""Defects a newcomer met in the first hour (issue 40), each as they met it."""

import json

import pytest

from tests.helpers import run_cli, write_config

pytestmark = pytest.mark.integration


@pytest.fixture()
def cli_home(home):
    yield home
    run_cli(home, "daemon", "stop", "--all")
    run_cli(home, "down", "--all", "--timeout", "5")


def test_ps_shows_the_table_and_warns_while_the_settings_have_a_typo(
    cli_home, tiny_model, fake_bin
):
    write_config(cli_home, "a", tiny_model, binary=str(fake_bin))
    r = run_cli(cli_home, "up", "a", "--no-daemon")
    assert r.returncode == 0, r.stderr
    cli_home.settings_path.write_text(json.dumps({"router": {"prot": 1}, "logs": {"backups": 2}}))
    r = run_cli(cli_home, "ps")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1].split()[:2] == ["a", "healthy*"]
    assert "warning: " in r.stderr and "router.prot: unknown field" in r.stderr
    assert "Traceback" not in r.stderr
    rows = json.loads(run_cli(cli_home, "ps", "--json").stdout)
    assert [x["name"] for x in rows] == ["a"]
    # what changes things still refuses the typo, with the same sentence
    r = run_cli(cli_home, "up", "a")
    assert r.returncode == 2 and "router.prot: unknown field" in r.stderr
