"""The router on real llama-server instances, with the official openai client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from llama_orchestrator.daemon.info import running
from llama_orchestrator.home import Home
from llama_orchestrator.states import InstanceState as S
from llama_orchestrator.store.database import Store
from tests.helpers import free_port, run_cli, wait_until, write_config

pytestmark = pytest.mark.integration


def settings(home: Home, **router) -> str:
    port = free_port()
    home.settings_path.write_text(json.dumps({"router": {"port": port, **router}}))
    return f"http://127.0.0.1:{port}"


def replicas(home: Home, tiny_model, n: int = 2, **overrides) -> list[str]:
    names = [f"r{i}" for i in range(1, n + 1)]
    for name in names:
        write_config(
            home,
            name,
            tiny_model,
            # one thread each: two servers spinning two threads each on a
            # two-core machine slow every token down a hundredfold
            model={"alias": "tiny", "threads": 1},
            tags=["worker"],
            restart_policy={"backoff_initial": 0.1},
            healthcheck={"interval": 0.5, "start_period": 30},
            **overrides,
        )
    r = run_cli(home, "up", *names)
    assert r.returncode == 0, r.stderr
    return names


def row(home: Home, name: str):
    store = Store.open(home.db_path)
    try:
        return store.get(name)
    finally:
        store.close()


@pytest.fixture()
def two(home, tiny_model, server_bin):
    url = settings(home)
    replicas(home, tiny_model)
    return url


# llama.cpp: no early stop, whatever the random model samples (the counts below are exact)
NO_EOS = {"ignore_eos": True}


def test_the_openai_client_works_through_the_router(home, two):
    client = openai.OpenAI(base_url=f"{two}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, extra_body=NO_EOS
    )
    assert chat.choices[0].message.content is not None and chat.usage.completion_tokens == 4
    done = client.completions.create(
        model="tags:worker", prompt="Once", max_tokens=3, extra_body=NO_EOS
    )
    assert done.choices[0].text is not None and done.usage.completion_tokens == 3
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=5,
            stream=True,
            extra_body=NO_EOS,
        )
    )
    assert len(chunks) >= 2  # arrived as separate SSE events
    assert any(c.choices and c.choices[0].finish_reason == "length" for c in chunks)
    status = json.loads(run_cli(home, "daemon", "status", "--json").stdout)
    assert status["router_url"] == two
    # a name the client hard-codes: with one model served it is that model, as direct
    other = client.chat.completions.create(
        model="gpt-3.5-turbo", messages=[{"role": "user", "content": "x"}], max_tokens=1
    )
    assert other.usage.completion_tokens == 1


def test_native_completion_and_health(two):
    r = httpx.post(f"{two}/completion", json={"prompt": "Hi", "n_predict": 2, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["tokens_predicted"] == 2  # the only model
    assert httpx.get(f"{two}/health").json() == {"status": "ok", "healthy_instances": 2}


def test_the_router_answers_as_llama_server_does_where_the_target_is_clear(home, two):
    """Issue 23.9: no `model` with one served, llama-server's instant routes,
    /v1/models with `meta`, and no CORS header from the instance."""
    direct = f"http://127.0.0.1:{json.loads(run_cli(home, 'ps', '--json').stdout)[0]['port']}"
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    r = httpx.post(f"{two}/v1/chat/completions", json=chat)  # no model: the only one
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 2
    # the instance sends an (empty) CORS header; the router sends none
    assert (
        "access-control-allow-origin"
        in httpx.post(f"{direct}/v1/chat/completions", json=chat).headers
    )
    assert not [h for h in r.headers if h.lower().startswith("access-control-")]

    tokens = httpx.post(f"{direct}/tokenize", json={"content": "Hello world"}).json()
    assert httpx.post(f"{two}/tokenize", json={"content": "Hello world"}).json() == tokens
    back = httpx.post(f"{two}/detokenize", json={"model": "tiny", **tokens})
    assert (
        back.status_code == 200
        and back.json() == httpx.post(f"{direct}/detokenize", json=tokens).json()
    )
    props = httpx.get(f"{two}/props", params={"model": "tags:worker"})
    assert props.status_code == 200 and "default_generation_settings" in props.json()
    slots = httpx.get(f"{two}/slots?model=tiny")
    assert slots.status_code == 200 and isinstance(slots.json(), list) and slots.json()
    # one model: any name means it (as llama-server answers); POST /props is its own
    nope = httpx.get(f"{two}/props", params={"model": "nope"})
    assert nope.status_code == 200 and "default_generation_settings" in nope.json()
    posted = httpx.post(f"{two}/props", json={})
    assert posted.status_code == httpx.post(f"{direct}/props", json={}).status_code

    ours = httpx.get(f"{two}/v1/models").json()["data"]
    theirs = httpx.get(f"{direct}/v1/models").json()["data"][0]
    assert [m["id"] for m in ours] == ["tiny"]
    assert ours[0]["meta"] == theirs["meta"] and ours[0]["meta"]["n_params"] > 0
    assert ours[0]["created"] > 1_700_000_000


def test_a_request_without_a_model_names_the_choices_when_several_are_served(
    home, tiny_model, server_bin
):
    url = settings(home)
    for name, alias in (("a", "first"), ("b", "second")):
        write_config(home, name, tiny_model, model={"alias": alias, "threads": 1})
    assert run_cli(home, "up", "a", "b").returncode == 0
    r = httpx.post(
        f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]}
    )
    assert r.status_code == 400 and "this router has several" in r.text
    assert r.json()["error"]["available"] == ["first", "second"]
    assert httpx.post(f"{url}/tokenize", json={"content": "x"}).status_code == 400
    assert (
        httpx.post(f"{url}/tokenize", json={"content": "x", "model": "second"}).status_code == 200
    )


def load(url: str, total: int, concurrency: int, during=None) -> tuple[int, list[str]]:
    """Chat requests at `concurrency`: at least `total`, and for as long as
    `during` (run in another thread once a fifth of them are done) lasts.
    Returns (requests sent, failures)."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    failures: list[str] = []
    sent = [0]
    lock = threading.Lock()
    started = threading.Event()
    side = threading.Thread(target=lambda: (started.wait(), during and during()))
    side.start()

    def worker() -> None:
        while True:
            with lock:
                i = sent[0]
                if i >= total and not side.is_alive():
                    return
                sent[0] += 1
            if i >= total // 5:
                started.set()
            try:
                client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": f"Hi {i}"}], max_tokens=8
                )
            except Exception as exc:  # noqa: BLE001 - every failure counts
                failures.append(f"{i}: {type(exc).__name__}: {exc}")

    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(worker)
    side.join()
    return sent[0], failures


def test_killing_a_replica_under_load_fails_no_request(home, two):
    victim = row(home, "r1")

    def kill() -> None:
        os.kill(victim.pid, signal.SIGKILL)

    sent, failures = load(two, 300, 8, during=kill)
    assert sent >= 300 and failures == []
    again = wait_until(lambda: (x := row(home, "r1")).state == S.HEALTHY and x, timeout=30)
    assert again.pid != victim.pid and again.restarts == 1  # and the daemon restarted it


def test_a_rolling_restart_under_load_fails_no_request(home, two):
    before = {n: row(home, n).pid for n in ("r1", "r2")}
    result: list = []

    def roll() -> None:
        result.append(run_cli(home, "restart", "--rolling", "tiny"))

    sent, failures = load(two, 300, 8, during=roll)
    assert sent >= 300 and failures == []
    assert result[0].returncode == 0, result[0].stderr
    assert all(row(home, n).pid != before[n] for n in before)


async def test_backpressure_queue_then_429_and_a_client_that_leaves_frees_its_slot(
    home, tiny_model, fake_bin
):
    url = settings(home, max_queue=2, queue_timeout=60)
    write_config(
        home,
        "solo",
        tiny_model,
        binary=str(fake_bin),
        model={"alias": "tiny"},
        server={"parallel": 1},
    )
    assert run_cli(home, "up", "solo").returncode == 0
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        slow = asyncio.create_task(  # the fake server answers this one after 60 s
            client.post("/v1/chat/completions", json={**chat, "user": "slow"})
        )
        await wait_async(lambda: _metric(url, "llama_orch_router_in_flight") == 1)
        queued = [
            asyncio.create_task(client.post("/v1/chat/completions", json=chat)) for _ in range(2)
        ]
        await wait_async(lambda: _metric(url, "llama_orch_router_queue_depth") == 2)
        refused = await client.post("/v1/chat/completions", json=chat)
        assert refused.status_code == 429 and refused.headers["retry-after"]
        assert refused.json()["error"]["type"] == "rate_limit_error"
        slow.cancel()  # the client leaves: the router drops the upstream request
        answers = await asyncio.wait_for(asyncio.gather(*queued), 30)  # the slot came free
        assert [a.status_code for a in answers] == [200, 200]


def test_a_client_leaving_mid_stream_frees_the_upstream_slot(home, tiny_model, server_bin):
    url = settings(home)
    write_config(
        home,
        "a",
        tiny_model,
        model={"alias": "tiny", "context_size": 16384, "threads": 1},
        server={"parallel": 1},
    )
    assert run_cli(home, "up", "a").returncode == 0
    slots_url = f"http://127.0.0.1:{row(home, 'a').port}/slots"
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 15000,
        "stream": True,
        "ignore_eos": True,  # llama.cpp: no early stop, whatever the random model says
    }
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data:")
        assert any(s["is_processing"] for s in httpx.get(slots_url).json())
    # closed after one line: llama-server stops generating, the router frees the slot
    wait_until(lambda: not any(s["is_processing"] for s in httpx.get(slots_url).json()))
    wait_until(lambda: _metric(url, "llama_orch_router_in_flight") == 0)


def _metric(url: str, name: str) -> float:
    """A gauge of the router's /metrics (summed over its labels)."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


async def wait_async(predicate, timeout: float = 20) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await asyncio.to_thread(predicate):
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def test_auth_limits_bad_input_and_host_check(home, tiny_model, server_bin):
    url = settings(home, api_keys=["sekret"], max_body_bytes=2000)
    write_config(home, "a", tiny_model, model={"alias": "tiny"})
    assert run_cli(home, "up", "a").returncode == 0
    ok = {"Authorization": "Bearer sekret"}
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    assert httpx.get(f"{url}/health").status_code == 200  # no key needed
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert (
        httpx.post(
            f"{url}/v1/chat/completions", json=chat, headers={"Authorization": "Bearer x"}
        ).status_code
        == 401
    )
    assert httpx.post(f"{url}/v1/chat/completions", json=chat, headers=ok).status_code == 200
    big = {**chat, "messages": [{"role": "user", "content": "x" * 5000}]}
    r = httpx.post(f"{url}/v1/chat/completions", json=big, headers=ok)
    assert r.status_code == 413 and "2000 bytes" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{nope", headers=ok)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/chat/completions", json={**chat, "model": ""}, headers=ok)
    assert r.status_code == 200  # no name: the only model
    r = httpx.get(f"{url}/v1/models", headers={**ok, "Host": "evil.example"})
    assert r.status_code == 421  # DNS rebinding
    assert "access-control-allow-origin" not in {k.lower() for k in r.headers}
    text = httpx.get(f"{url}/metrics", headers=ok).text
    assert 'llama_orch_router_requests_total{instance="a",model="tiny",status="200"} 2.0' in text


def test_no_healthy_instance_is_503_and_a_wide_bind_needs_keys(home, tiny_model, server_bin):
    url = settings(home)
    write_config(home, "a", tiny_model, model={"alias": "tiny"})
    assert run_cli(home, "daemon", "start").returncode == 0
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x"})
    # stopped, not starting: how to start it, and no invitation to retry (issue 40)
    assert r.status_code == 503 and "retry-after" not in r.headers
    assert "'tiny' is stopped; start it with `llama-orch up a`" in r.json()["error"]["message"]
    assert run_cli(home, "daemon", "stop").returncode == 0

    home.settings_path.write_text(json.dumps({"router": {"host": "0.0.0.0", "port": free_port()}}))
    assert run_cli(home, "daemon", "start").returncode == 0
    assert running(home).router_url is None
    ev = run_cli(home, "events", "--json").stdout.splitlines()
    assert any(json.loads(x)["kind"] == "router_refused" for x in ev)


def test_tags_route_to_an_instance_that_carries_every_tag_listed(home, tiny_model, server_bin):
    url = settings(home)
    for name, tags in (("gpu-worker", ["worker", "gpu"]), ("cpu-worker", ["worker"])):
        write_config(home, name, tiny_model, model={"threads": 1}, tags=tags)
    assert run_cli(home, "up", "gpu-worker", "cpu-worker").returncode == 0
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")

    def served_by(model: str) -> set[str]:
        """Which instances answered (llama-server names its --alias, the instance)."""
        answers = [
            client.completions.create(model=model, prompt="a", max_tokens=1) for _ in range(4)
        ]
        return {a.model for a in answers}

    # one at a time, a tie goes to the first by name (cpu-worker): only the tag set
    # keeps these on gpu-worker
    assert served_by("tags:gpu,worker") == {"gpu-worker"}
    assert served_by("tags:worker, gpu") == {"gpu-worker"}  # any order, any spacing
    assert served_by("tags:worker") <= {"gpu-worker", "cpu-worker"}
    with pytest.raises(openai.NotFoundError, match="tags:cpu,gpu"):
        client.completions.create(model="tags:gpu,cpu", prompt="a", max_tokens=1)
