"""On-demand instances on real llama-server (issue 9): started by the first
request, stopped when idle, swapped out for another when VRAM is short.

VRAM comes from a fake nvidia-smi reporting one 6 GB card, and each model is
declared to need 3.5 GB (`gpu.vram_mib`); the servers (a CPU build) run on the
CPU whatever CUDA_VISIBLE_DEVICES says, which is all the decisions need."""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from llama_orchestrator.home import Home
from llama_orchestrator.models.tiny import write_tiny_model
from llama_orchestrator.store.database import Store
from tests.helpers import free_port, run_cli, wait_until, write_config, write_unloadable_model

pytestmark = pytest.mark.integration

FAKES = Path(__file__).parents[1] / "fakes"
ONE_6GB_CARD = {
    "PATH": f"{FAKES / 'gpu_bin'}{os.pathsep}{os.environ['PATH']}",
    "PYTHONPATH": str(FAKES / "no_nvml"),
    "FAKE_NVIDIA_SMI": str(FAKES / "gpu_outputs" / "one_6gb.csv"),
}


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a 16k training context: a request of thousands of
    tokens lasts seconds (llama-server caps a slot at the training context)."""
    return write_tiny_model(tmp_path_factory.mktemp("long") / "long.gguf", n_ctx=16384)


def setup(
    home: Home,
    tiny_model: Path,
    names: list[str],
    idle_ttl: float,
    load_timeout: float = 60,
    on_demand_group: str | None = None,
    **extra,
) -> str:
    port = free_port()
    home.settings_path.write_text(json.dumps({"router": {"port": port}}))
    for name in names:
        write_config(
            home,
            name,
            tiny_model,
            model={"threads": 1, "context_size": 16384},
            healthcheck=extra.pop("healthcheck", {"interval": 0.5}),
            on_demand={
                "idle_ttl": idle_ttl,
                "load_timeout": load_timeout,
                "group": on_demand_group,
            },
            **extra,
        )
    r = run_cli(home, "up", "--all", env=ONE_6GB_CARD)  # starts the daemon, not them
    assert r.returncode == 0, r.stderr
    for name in names:
        assert f"{name} is on demand" in r.stdout
    return f"http://127.0.0.1:{port}"


def chat(url: str, model: str, tokens: int = 4) -> httpx.Response:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": tokens,
        "ignore_eos": True,  # llama.cpp: the random model may say EOS first; counts are checked
    }
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def ps(home: Home) -> dict[str, dict]:
    r = run_cli(home, "ps", "--json")
    assert r.returncode == 0, r.stderr
    return {x["name"]: x for x in json.loads(r.stdout)}


def events(home: Home, kind: str, name: str | None = None) -> list:
    store = Store.open(home.db_path)
    try:
        return [e for e in store.events(name) if e.kind == kind]
    finally:
        store.close()


def servers_of(home: Home, name: str) -> list[psutil.Process]:
    port = str(json.loads(home.config_path(name).read_text())["server"]["port"])
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if any("llama-server" in c for c in cmd[:1]) and port in cmd:
            out.append(p)
    return out


def long_stream(url: str, model: str, tokens: int, result: dict) -> None:
    """A streamed completion of `tokens` tokens (seconds on the tiny model)."""
    body = {
        "model": model,
        "prompt": "Once",
        "n_predict": tokens,
        "ignore_eos": True,
        "stream": True,
    }
    n = 0
    with httpx.stream("POST", f"{url}/completion", json=body, timeout=120) as r:
        result["status"] = r.status_code
        for line in r.iter_lines():
            if line.startswith("data: "):
                n += 1
                if json.loads(line[6:]).get("stop"):
                    result["stop"] = True
    result["chunks"] = n


def test_first_requests_start_it_once_and_it_stops_when_idle(home, long_model, server_bin):
    url = setup(home, long_model, ["od"], idle_ttl=1.5)
    assert ps(home)["od"]["state"] == "created"
    table = run_cli(home, "ps").stdout
    assert "idle (on demand)" in table and "LAST USED" in table
    models = httpx.get(f"{url}/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["od"]  # listed before it runs

    with ThreadPoolExecutor(6) as pool:  # concurrent first requests
        answers = list(pool.map(lambda i: chat(url, "od"), range(6)))
    assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers]
    assert all(a.json()["usage"]["completion_tokens"] == 4 for a in answers)
    assert len(events(home, "on_demand_start", "od")) == 1
    assert len(events(home, "starting", "od")) == 1  # started exactly once
    assert len(servers_of(home, "od")) == 1

    view = ps(home)["od"]
    assert view["on_demand"] and view["state"] == "healthy" and view["last_used_at"]
    assert 0 <= view["idle_stop_in_s"] <= 1.5

    wait_until(lambda: ps(home)["od"]["state"] == "stopped", timeout=30, interval=0.2)
    (stop,) = events(home, "idle_stop", "od")
    assert "no request for 1.5s" in stop.message
    assert servers_of(home, "od") == []
    assert ps(home)["od"]["last_used_at"]  # kept after the stop

    # a request longer than idle_ttl is not cut; the instance stops after it
    result: dict = {}
    long_stream(url, "od", 6000, result)  # seconds: longer than idle_ttl
    assert result == {"status": 200, "stop": True, "chunks": 6001}, result
    assert len(events(home, "idle_stop", "od")) == 1  # not during the request
    wait_until(lambda: len(events(home, "idle_stop", "od")) == 2, timeout=30, interval=0.2)


def test_a_request_for_b_swaps_idle_a_out_and_waits_while_a_is_busy(home, long_model, server_bin):
    gpu = {"backend": "cuda", "device_id": 0, "vram_mib": 3584}
    url = setup(home, long_model, ["a", "b"], idle_ttl=300, gpu=gpu)
    check = run_cli(home, "config", "validate", env=ONE_6GB_CARD)
    assert check.returncode == 0 and "cannot hold" not in check.stderr  # swapped, not together

    assert chat(url, "a").status_code == 200
    assert chat(url, "b").status_code == 200  # a is idle: swapped out for b
    (swap,) = events(home, "swapped_out", "a")
    assert swap.message == "swapped out for b: 3.5 GB needed on GPU 0, 2.5 GB free"
    view = ps(home)
    assert (view["a"]["state"], view["b"]["state"]) == ("stopped", "healthy")
    assert servers_of(home, "a") == []

    # b busy with a long request: a request for a waits, b is not stopped
    result: dict = {}
    busy = threading.Thread(target=long_stream, args=(url, "b", 4000, result))
    busy.start()
    wait_until(lambda: "status" in result, timeout=30)
    answer = chat(url, "a")
    busy.join()
    assert answer.status_code == 200, answer.text
    assert result == {"status": 200, "stop": True, "chunks": 4001}, result  # not cut
    (waited,) = events(home, "on_demand_wait", "a")
    assert "a needs 3.5 GB on GPU 0 and only 2.5 GB can be freed" in waited.message
    swaps = events(home, "swapped_out", "b")
    assert len(swaps) == 1 and swaps[0].ts > waited.ts  # b went only after its request
    b_stopped = [e for e in events(home, "stopped", "b")]
    assert b_stopped and b_stopped[0].ts >= waited.ts
    view = ps(home)
    assert (view["a"]["state"], view["b"]["state"]) == ("healthy", "stopped")
    metrics = httpx.get(f"{url}/metrics").text
    for line in (
        'llama_orch_on_demand_events_total{instance="a",kind="swapped_out"} 1.0',
        'llama_orch_on_demand_events_total{instance="b",kind="swapped_out"} 1.0',
        'llama_orch_on_demand_events_total{instance="a",kind="on_demand_start"} 2.0',
        'llama_orch_on_demand_events_total{instance="a",kind="on_demand_wait"} 1.0',
    ):
        assert line in metrics, line


def test_a_start_that_fails_answers_the_waiting_requests_at_once(
    home, tiny_model, server_bin, tmp_path
):
    url = setup(home, tiny_model, ["od"], idle_ttl=60)
    broken = write_unloadable_model(tmp_path / "broken.gguf")  # fails in llama-server itself
    cfg = json.loads(home.config_path("od").read_text())
    cfg["model"]["path"] = str(broken)
    cfg["restart_policy"] = {"mode": "no"}
    home.config_path("od").write_text(json.dumps(cfg))
    r = chat(url, "od")
    assert r.status_code == 503 and r.headers["retry-after"]
    assert r.json()["error"]["message"].startswith("'od' failed to start: the server exited")
    assert servers_of(home, "od") == []


def test_a_model_still_loading_after_load_timeout_is_503_with_retry_after(
    home, tiny_model, fake_bin
):
    url = setup(
        home,
        tiny_model,
        ["od"],
        idle_ttl=1,
        load_timeout=1,
        binary=str(fake_bin),
        env={"FAKE_HEALTH": "503"},  # loading forever
        healthcheck={"interval": 0.5, "start_period": 60},
    )
    r = chat(url, "od")
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["message"] == "'od' did not finish loading within 1s."
    # no request waits for it any more: it is stopped once idle
    wait_until(lambda: events(home, "idle_stop", "od"), timeout=30, interval=0.2)
    wait_until(lambda: ps(home)["od"]["state"] == "stopped", timeout=30, interval=0.2)


def test_a_group_runs_max_running_members_at_once(home, tiny_model, server_bin):
    url = setup(home, tiny_model, ["a", "b", "c"], idle_ttl=300, on_demand_group="big")
    groups = {"router": json.loads(home.settings_path.read_text())["router"]}
    groups["groups"] = {"big": {"max_running": 2}}
    home.settings_path.write_text(json.dumps(groups))
    run_cli(home, "daemon", "stop")  # settings are read when the daemon starts
    assert run_cli(home, "daemon", "start").returncode == 0
    for name in ("a", "b", "c"):
        assert chat(url, name).status_code == 200
    (swap,) = events(home, "swapped_out")
    assert (swap.instance, swap.message) == ("a", "swapped out for c: group 'big' runs at most 2")
    view = ps(home)
    assert [view[n]["state"] for n in ("a", "b", "c")] == ["stopped", "healthy", "healthy"]
