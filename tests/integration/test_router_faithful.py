"""The router as faithful as the llama-server behind it (issue 39): every
path llama-server answers, its model-name leniency, its readiness, its
auth and error shapes, CORS for allowed pages, an instance's own /metrics
and slot actions, and its model management API. Each check compares with
the instance asked directly where the answer is llama-server's."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from llama_orchestrator.home import Home
from tests.helpers import free_port, run_cli, wait_until, write_config

pytestmark = pytest.mark.integration

NO_EOS = {"ignore_eos": True}
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def settings(home: Home, **router) -> str:
    port = free_port()
    home.settings_path.write_text(json.dumps({"router": {"port": port, **router}}))
    return f"http://127.0.0.1:{port}"


def port_of(home: Home, name: str) -> int:
    rows = json.loads(run_cli(home, "ps", "--json").stdout)
    return next(r["port"] for r in rows if r["name"] == name)


@pytest.fixture()
def one(home, tiny_model, server_bin, tmp_path):
    """One model, "tiny", served by instance "a" (embeddings on, as an
    embedding client needs, and slots that can be saved): (router URL, the
    instance's own URL)."""
    url = settings(home)
    extra = ["--embeddings", "--pooling", "mean", "--slot-save-path", str(tmp_path)]
    write_config(
        home,
        "a",
        tiny_model,
        model={"alias": "tiny", "threads": 1},
        server={"extra_args": extra},
    )
    r = run_cli(home, "up", "a")
    assert r.returncode == 0, r.stderr
    return url, f"http://127.0.0.1:{port_of(home, 'a')}"


@pytest.mark.parametrize("suffix", ["/v1", ""])
def test_the_openai_client_with_and_without_v1(one, suffix: str) -> None:
    url, _ = one
    client = openai.OpenAI(base_url=url + suffix, api_key="unused")
    assert "tiny" in [m.id for m in client.models.list().data]
    chat = client.chat.completions.create(
        model="gpt-3.5-turbo",  # hard-coded by the client: the only model serves it
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        extra_body=NO_EOS,
    )
    assert chat.usage.completion_tokens == 3
    if suffix:  # /completions and /embeddings are llama-server's own shapes, not OpenAI's
        done = client.completions.create(
            model="tiny", prompt="Once", max_tokens=2, extra_body=NO_EOS
        )
        assert done.usage.completion_tokens == 2
        emb = client.embeddings.create(model="text-embedding-3-small", input=["hello", "world"])
        assert len(emb.data) == 2 and len(emb.data[0].embedding) > 0
    answer = client.responses.create(model="tiny", input="Hi", max_output_tokens=3)
    assert answer.status == "completed" and answer.usage.output_tokens >= 1
    streamed = list(
        client.responses.create(model="tiny", input="Hi", max_output_tokens=3, stream=True)
    )
    assert streamed[-1].type == "response.completed"


def test_llama_servers_other_paths_answer_through_the_router_as_direct(one) -> None:
    url, direct = one
    for path, body in [
        ("/apply-template", {"messages": [{"role": "user", "content": "Hi"}]}),
        ("/v1/chat/completions/input_tokens", {"messages": [{"role": "user", "content": "Hi"}]}),
        ("/tokenize", {"content": "Hello world", "with_pieces": True}),
        ("/infill", {"input_prefix": "def f(", "input_suffix": ")", "n_predict": 1}),
        ("/v1/rerank", {"query": "a", "documents": ["b"]}),
        ("/v1/no-such-route", {}),
    ]:
        ours, theirs = httpx.post(url + path, json=body), httpx.post(direct + path, json=body)
        assert ours.status_code == theirs.status_code, (path, ours.text, theirs.text)
        if theirs.status_code == 200 and path != "/infill":
            assert ours.json() == theirs.json(), path
        else:
            assert ours.json()["error"]["type"] == theirs.json()["error"]["type"], path
    head = httpx.head(url + "/props", timeout=10)
    assert head.status_code == 200 and head.content == b""
    # a method llama-server does not take is its own 404, not a 405 of ours
    wrong = httpx.get(url + "/v1/chat/completions")
    assert wrong.status_code == httpx.get(direct + "/v1/chat/completions").status_code
    assert wrong.headers["content-type"].startswith("application/json")
    # JSON labelled as llama-server labels it
    assert httpx.get(url + "/v1/models").headers["content-type"] == (
        "application/json; charset=utf-8"
    )


def test_slot_actions_and_metrics_of_one_instance(home, one) -> None:
    url, direct = one
    ours = httpx.get(f"{url}/metrics").text
    assert "llama_orch_router_requests_total" in ours and "llamacpp:" not in ours
    theirs = httpx.get(f"{url}/metrics", params={"instance": "a"})
    assert theirs.status_code == 200 and "llamacpp:prompt_tokens_total" in theirs.text
    assert "llama_orch_" not in theirs.text
    r = httpx.post(f"{url}/slots/0", params={"action": "erase", "instance": "a"})
    assert r.status_code == 200 and r.json()["id_slot"] == 0, r.text
    save = {"filename": "slot0.bin"}
    r = httpx.post(f"{url}/slots/0", params={"action": "save", "instance": "a"}, json=save)
    assert r.status_code == 200 and r.json()["filename"] == "slot0.bin", r.text
    r = httpx.post(f"{url}/slots/0", params={"action": "restore", "instance": "a"}, json=save)
    assert r.status_code == 200 and r.json()["id_slot"] == 0, r.text
    missing = httpx.get(f"{url}/slots", params={"instance": "zz"})
    assert missing.status_code == 404 and "healthy: a" in missing.json()["error"]["message"]
    assert missing.json()["error"]["type"] == "not_found_error"


def test_health_is_503_until_an_instance_is_healthy(home, tiny_model, server_bin) -> None:
    url = settings(home)
    write_config(home, "a", tiny_model, model={"alias": "tiny", "threads": 1})
    assert run_cli(home, "daemon", "start").returncode == 0
    for path in ("/health", "/v1/health"):
        r = httpx.get(url + path)
        assert r.status_code == 503, r.text
        assert r.json()["healthy_instances"] == 0
        assert r.json()["error"]["type"] == "unavailable_error"
    assert run_cli(home, "up", "a").returncode == 0
    for path in ("/health", "/v1/health"):
        r = httpx.get(url + path)
        assert r.status_code == 200 and r.json() == {"status": "ok", "healthy_instances": 1}


def test_model_names_map_and_alias_lists(home, tiny_model, server_bin) -> None:
    url = settings(home, model_map={"gpt-4o-mini": "second"})
    write_config(home, "a", tiny_model, model={"alias": "first,primary", "threads": 1})
    write_config(home, "b", tiny_model, model={"alias": "second", "threads": 1})
    assert run_cli(home, "up", "a", "b").returncode == 0
    # one entry per model, as llama-server lists itself: its first name, and every name
    listed = {m["id"]: m for m in httpx.get(f"{url}/v1/models").json()["data"]}
    assert sorted(listed) == ["first", "second"]
    assert sorted(listed["first"]["aliases"]) == ["first", "primary"]
    for model in ("primary", "first", "gpt-4o-mini"):
        r = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "model": model})
        assert r.status_code == 200, (model, r.text)
    nope = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "model": "gpt-3.5-turbo"})
    assert nope.status_code == 404 and nope.json()["error"]["type"] == "not_found_error"
    assert nope.json()["error"]["available"] == ["first", "primary", "second"]
    metrics = httpx.get(f"{url}/metrics").text  # the map's model took its request
    assert 'instance="b",model="second",status="200"} 1.0' in metrics
    assert 'instance="a",model="primary",status="200"} 1.0' in metrics


def test_strict_model_names_with_one_model(home, tiny_model, server_bin) -> None:
    url = settings(home, strict_models=True)
    write_config(home, "a", tiny_model, model={"alias": "tiny", "threads": 1})
    assert run_cli(home, "up", "a").returncode == 0
    strict = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "model": "gpt-4"})
    assert strict.status_code == 404 and "available: tiny" in strict.text
    loose = httpx.post(f"{url}/v1/chat/completions", json=CHAT)
    assert loose.status_code == 200  # no name at all: the only model, strict or not


def test_keys_in_either_header_and_llama_servers_error_shapes(home, tiny_model, server_bin):
    url = settings(home, api_keys=["sekret"])
    write_config(home, "a", tiny_model, model={"alias": "tiny", "threads": 1})
    assert run_cli(home, "up", "a").returncode == 0
    chat = {**CHAT, "model": "tiny"}
    refused = httpx.post(f"{url}/v1/chat/completions", json=chat)
    assert refused.status_code == 401
    assert refused.json()["error"]["type"] == "authentication_error"
    for headers in ({"Authorization": "Bearer sekret"}, {"X-Api-Key": "sekret"}):
        r = httpx.post(f"{url}/v1/chat/completions", json=chat, headers=headers)
        assert r.status_code == 200, (headers, r.text)
    assert httpx.get(f"{url}/v1/health").status_code == 200  # public, as llama-server's
    # ... the router's health only: not another method, nor an instance's path
    assert httpx.post(f"{url}/health").status_code == 401
    assert httpx.get(f"{url}/health", params={"instance": "a"}).status_code == 401


def test_cors_for_an_allowed_page_only(home, tiny_model, server_bin) -> None:
    page = "http://localhost:5173"
    url = settings(home, allowed_origins=[page])
    write_config(home, "a", tiny_model, model={"alias": "tiny", "threads": 1})
    assert run_cli(home, "up", "a").returncode == 0
    # what a browser sends before a JSON POST from the page
    pre = httpx.options(
        f"{url}/v1/chat/completions",
        headers={
            "Origin": page,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert pre.status_code == 200, pre.text
    assert pre.headers["access-control-allow-origin"] == page
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert "content-type" in pre.headers["access-control-allow-headers"]
    r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers={"Origin": page})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == page
    stream = httpx.post(
        f"{url}/v1/chat/completions", json={**CHAT, "stream": True}, headers={"Origin": page}
    )
    assert stream.status_code == 200 and stream.headers["access-control-allow-origin"] == page
    # another page: refused, and told nothing a browser would let it read
    evil = "http://evil.example"
    pre = httpx.options(
        f"{url}/v1/chat/completions",
        headers={"Origin": evil, "Access-Control-Request-Method": "POST"},
    )
    # llama-server's answer to a preflight is 200; without the CORS headers
    # the browser sends nothing
    assert pre.status_code == 200 and "access-control-allow-origin" not in pre.headers
    r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers={"Origin": evil})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers


def test_the_model_management_api_of_llama_servers_router_mode(
    home, tiny_model, server_bin
) -> None:
    url = settings(home)
    write_config(home, "a", tiny_model, model={"alias": "first", "threads": 1})
    write_config(home, "b", tiny_model, model={"alias": "second", "threads": 1})
    assert run_cli(home, "up", "a").returncode == 0

    def statuses() -> dict[str, str]:
        data = httpx.get(f"{url}/models").json()["data"]
        assert len(data) == len({m["id"] for m in data})  # one entry per model
        return {m["id"]: m["status"]["value"] for m in data}

    assert statuses() == {"first": "loaded", "second": "unloaded"}
    props = httpx.get(f"{url}/props").json()
    assert props["role"] == "router"  # several models: the web UI lists them
    one = httpx.get(f"{url}/props", params={"model": "first"}).json()
    assert "default_generation_settings" in one and one.get("role") != "router"

    r = httpx.post(f"{url}/models/load", json={"model": "second"})
    assert r.status_code == 200 and r.json() == {"success": True}
    wait_until(lambda: statuses()["second"] == "loaded", timeout=60)
    r = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "model": "second"})
    assert r.status_code == 200
    r = httpx.post(f"{url}/models/unload", json={"model": "first"})
    assert r.status_code == 200
    assert statuses() == {"first": "unloaded", "second": "loaded"}
    ps = {row["name"]: row["state"] for row in json.loads(run_cli(home, "ps", "--json").stdout)}
    assert ps == {"a": "stopped", "b": "healthy"}
    again = httpx.post(f"{url}/models/unload", json={"model": "first"})
    assert again.status_code == 400 and "not loaded" in again.json()["error"]["message"]
    ghost = httpx.post(f"{url}/models/load", json={"model": "ghost"})
    assert ghost.status_code == 404 and ghost.json()["error"]["type"] == "not_found_error"


def test_the_web_ui_of_an_instance_through_the_router(one) -> None:
    url, direct = one
    theirs = httpx.get(direct + "/")
    ours = httpx.get(url + "/")
    assert ours.status_code == theirs.status_code
    assert ours.content == theirs.content
    assert ours.headers.get("content-type") == theirs.headers.get("content-type")
