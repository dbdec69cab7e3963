"""One model load at a time (`loads.max_concurrent`), loads that outlast
start_period, and out-of-memory exits, on real processes: the daemon, the CLI
and the fake server (a real llama-server loads the tiny model in milliseconds,
and runs out of memory only on a real card)."""

from __future__ import annotations

import json

import pytest

from llama_orchestrator.home import Home
from llama_orchestrator.store.database import Store
from tests.helpers import run_cli, wait_until, write_config, write_settings

pytestmark = pytest.mark.integration

FAST = {"interval": 0.2, "timeout": 0.5, "retries": 2, "start_period": 0}
NAMES = ["a", "b", "c", "d", "e"]


def _events(home: Home) -> list:
    store = Store.open(home.db_path)
    try:
        return store.events()
    finally:
        store.close()


def _ps(home: Home) -> dict[str, dict]:
    r = run_cli(home, "ps", "--json")
    assert r.returncode == 0, r.stderr
    return {x["name"]: x for x in json.loads(r.stdout)}


def _loading_spans(home: Home) -> dict[str, list[tuple[float, float]]]:
    """Each run's time from its start to its first verdict (or end), from the events."""
    spans: dict[str, list[tuple[float, float]]] = {}
    began: dict[str, float] = {}
    for e in _events(home):
        if e.instance is None:
            continue
        if e.kind == "starting":
            began[e.instance] = e.ts
        elif e.instance in began and e.kind in ("healthy", "unhealthy", "exited", "stopped"):
            spans.setdefault(e.instance, []).append((began.pop(e.instance), e.ts))
    assert not began, f"still loading: {began}"
    return spans


def test_five_instances_up_load_one_at_a_time_all_healthy_none_restarted(
    home, tiny_model, fake_bin
):
    write_settings(home, {"loads": {"max_concurrent": 1}})
    for name in NAMES:
        write_config(
            home,
            name,
            tiny_model,
            binary=str(fake_bin),
            env={"FAKE_LOAD_S": "2"},
            healthcheck={**FAST, "start_period": 10},
        )
    try:
        r = run_cli(home, "up", "--all", "--no-wait")
        assert r.returncode == 0, r.stderr
        # each says where it stands among all five, not among those queued before it
        for k, name in enumerate(NAMES[1:], 2):
            assert f"{name} queued (load {k} of 5)" in r.stdout, r.stdout
        ps = _ps(home)
        assert ps["a"]["state"] == "starting" and ps["a"]["load_position"] == [1, 5]
        assert [ps[n]["state"] for n in NAMES[1:]] == ["queued"] * 4
        assert [ps[n]["load_position"] for n in NAMES[1:]] == [[k, 5] for k in range(2, 6)]
        text = run_cli(home, "ps").stdout
        assert "queued (load 3 of 5)" in text
        described = run_cli(home, "describe", "c")
        assert "queued (load 3 of 5)" in described.stdout, described.stdout
        r = run_cli(home, "up", "--all", "--timeout", "60")  # waits for the queued ones too
        assert r.returncode == 0, r.stderr
        assert "e healthy (pid" in r.stdout
        ps = _ps(home)
        assert all(ps[n]["state"] == "healthy" and ps[n]["restarts"] == 0 for n in NAMES)
        assert all(ps[n]["load_position"] is None for n in NAMES)
        spans = _loading_spans(home)
        assert sorted(spans) == NAMES and all(len(spans[n]) == 1 for n in NAMES)
        ordered = sorted(s for n in NAMES for s in spans[n])
        for (_, end), (start, _) in zip(ordered, ordered[1:], strict=False):
            assert start >= end, f"two loads at once: {ordered}"  # never more than one
        assert all(end - start >= 1.9 for start, end in ordered)  # each really loaded ~2 s
        kinds = [e.kind for e in _events(home)]
        assert "backoff" not in kinds and "unhealthy" not in kinds
    finally:
        run_cli(home, "down", "--all", "--timeout", "5")


def test_a_load_longer_than_start_period_that_shows_progress_is_not_restarted(
    home, tiny_model, fake_bin
):
    write_config(
        home,
        "slow",
        tiny_model,
        binary=str(fake_bin),
        env={"FAKE_LOAD_S": "3", "FAKE_QUIET": "1"},  # its dots are its only output
        healthcheck={**FAST, "start_period": 0.5, "load_timeout": 1.5},
        restart_policy={"backoff_initial": 0.05},
    )
    try:
        assert run_cli(home, "up", "slow", "--no-wait").returncode == 0
        seen = wait_until(lambda: (_ps(home)["slow"].get("load_progress") or 0) > 10 and _ps(home))
        assert seen["slow"]["state"] == "starting"
        assert "starting (" in run_cli(home, "ps").stdout  # e.g. starting (37%)
        r = run_cli(home, "up", "slow", "--timeout", "30")
        assert r.returncode == 0, r.stderr
        ps = _ps(home)["slow"]
        assert ps["state"] == "healthy" and ps["restarts"] == 0
        (span,) = _loading_spans(home)["slow"]
        assert span[1] - span[0] >= 2.5  # far past start_period, and never a failure
    finally:
        run_cli(home, "down", "--all", "--timeout", "5")


def test_a_load_that_makes_no_progress_for_load_timeout_fails_and_is_restarted(
    home, tiny_model, fake_bin
):
    write_config(
        home,
        "hung",
        tiny_model,
        binary=str(fake_bin),
        env={"FAKE_LOAD_STALL": "1", "FAKE_QUIET": "1"},
        healthcheck={**FAST, "start_period": 0.5, "load_timeout": 1.0},
        restart_policy={"backoff_initial": 0.05, "max_retries": 1},
    )
    try:
        assert run_cli(home, "up", "hung", "--no-wait").returncode == 0
        wait_until(lambda: _ps(home)["hung"]["state"] == "failed", timeout=30)
        evs = [e for e in _events(home) if e.instance == "hung"]
        started = next(e for e in evs if e.kind == "starting")
        unhealthy = next(e for e in evs if e.kind == "unhealthy")
        assert unhealthy.ts - started.ts >= 1.0  # silent for load_timeout first
        assert [e.kind for e in evs].count("starting") == 2  # restarted once (max_retries 1)
    finally:
        run_cli(home, "down", "--all", "--timeout", "5")


def test_an_out_of_memory_exit_fails_after_one_attempt_and_says_how_to_fix_it(
    home, tiny_model, fake_bin
):
    write_config(
        home,
        "big",
        tiny_model,
        binary=str(fake_bin),
        env={"FAKE_OOM": "1"},
        healthcheck=FAST,
        restart_policy={"mode": "always", "max_retries": 5, "backoff_initial": 0.05},
    )
    try:
        r = run_cli(home, "up", "big", "--timeout", "30")
        assert r.returncode == 1 and "cudaMalloc failed: out of memory" in r.stderr
        wait_until(lambda: _ps(home)["big"]["state"] == "failed", timeout=30)
        ps = _ps(home)["big"]
        assert ps["restarts"] == 0  # one attempt, not the whole budget
        evs = [e for e in _events(home) if e.instance == "big"]
        assert [e.kind for e in evs].count("starting") == 1
        (failed,) = [e for e in evs if e.kind == "failed"]
        assert failed.message.startswith("llama-server ran out of memory loading its model (")
        assert "lower gpu.layers (-ngl) or model.context_size, or set gpu.vram_mib" in (
            failed.message
        )
        described = run_cli(home, "describe", "big").stdout
        assert "ran out of memory" in described
    finally:
        run_cli(home, "down", "--all", "--timeout", "5")


def test_a_queued_instance_survives_a_daemon_restart_and_loads(home, tiny_model, fake_bin):
    write_settings(home, {"loads": {"max_concurrent": 1}})
    for name, load in (("a", "4"), ("b", "0.5")):  # a still loads when the daemon goes
        write_config(
            home,
            name,
            tiny_model,
            binary=str(fake_bin),
            env={"FAKE_LOAD_S": load},
            healthcheck={**FAST, "start_period": 10},
        )
    try:
        assert run_cli(home, "up", "a", "b", "--no-wait").returncode == 0
        assert _ps(home)["b"]["state"] == "queued"
        assert run_cli(home, "daemon", "stop").returncode == 0  # the instances keep running
        assert _ps(home)["b"]["state"] == "queued" and _ps(home)["b"]["load_position"] is None
        r = run_cli(home, "daemon", "start")
        assert r.returncode == 0, r.stderr
        wait_until(lambda: all(x["state"] == "healthy" for x in _ps(home).values()), timeout=30)
        spans = _loading_spans(home)
        assert spans["b"][0][0] >= spans["a"][0][1]  # b waited for a, across the restart
    finally:
        run_cli(home, "down", "--all", "--timeout", "5")
