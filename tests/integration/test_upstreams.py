"""External upstreams and escalation (issue 17) for real: a second real
llama-server stands in for the external API, with a key it checks itself
(`--api-key`) and a grammar that makes it answer "OK" (the better model a
task escalates to). Between the daemon and it, a recording proxy counts
what the API side sees: requests at once, their bodies and headers."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time

import httpx
import pytest

from llama_orchestrator.home import Home
from tests.helpers import free_port, run_cli, wait_until, write_config

pytestmark = pytest.mark.integration

KEY = "sk-test-0123456789abcdefghij"
KEY_ENV = "LLAMA_ORCH_TEST_UPSTREAM_KEY"
PRICE = {"input_per_mtok": 3.0, "output_per_mtok": 15.0}


class Recorder:
    """An HTTP proxy in front of the stand-in: what the upstream side gets
    (method, path, Authorization, body), how many requests at once, a delay
    per request (so a burst overlaps), and `down()`/`up()` (its port closed)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self.seen: list[dict] = []
        self.in_flight = self.most = 0
        self.delay = 0.0
        #: answer requests (not the checks' GET /models) 401, as an API whose
        #: /models needs no key, or whose key was revoked, does
        self.refuse = False
        self._loop = asyncio.new_event_loop()
        self._runner = None
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        self.up()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def up(self) -> None:
        self._call(self._start())

    def down(self) -> None:
        self._call(self._stop())

    def close(self) -> None:
        self.down()
        self._loop.call_soon_threadsafe(self._loop.stop)

    async def _start(self) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _forward(self, request):
        import aiohttp
        from aiohttp import web

        body = await request.read()
        self.seen.append(
            {
                "method": request.method,
                "path": request.path,
                "auth": request.headers.get("Authorization"),
                "body": body.decode("utf-8", "replace"),
            }
        )
        work = request.method == "POST"  # a request, not a health check's GET /models
        if work and self.refuse:
            error = {"message": "Invalid API Key", "type": "invalid_request_error"}
            return web.json_response({"error": error}, status=401)
        self.in_flight += work
        self.most = max(self.most, self.in_flight)
        try:
            await asyncio.sleep(self.delay if work else 0)
            async with aiohttp.ClientSession() as s:
                headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
                async with s.request(
                    request.method,
                    f"http://127.0.0.1:{self.target}{request.path_qs}",
                    headers=headers,
                    data=body,
                ) as r:
                    out = web.StreamResponse(status=r.status)
                    out.content_type = r.content_type
                    await out.prepare(request)
                    async for chunk in r.content.iter_any():
                        await out.write(chunk)
                    await out.write_eof()
                    return out
        finally:
            self.in_flight -= work

    def posts(self) -> list[dict]:
        return [x for x in self.seen if x["method"] == "POST"]


@pytest.fixture(scope="module")
def standin(tiny_model, server_bin):
    """The external API: a real llama-server that wants KEY and answers "OK"."""
    port = free_port()
    proc = subprocess.Popen(
        [str(server_bin), "-m", str(tiny_model), "--host", "127.0.0.1", "--port", str(port)]
        + ["-c", "8192", "-np", "4", "-t", "1", "--api-key", KEY, "--grammar", 'root ::= "OK"'],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: _answers(port), timeout=30, interval=0.1)
        recorder = Recorder(port)
        yield recorder
        recorder.close()
    finally:
        proc.kill()
        proc.wait(10)


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def upstream(home: Home, name: str, url: str, **extra) -> None:
    cfg = {
        "upstream": {"url": url, "api_key_env": KEY_ENV, "model": "remote-tiny", **extra},
        "healthcheck": {"interval": 0.5, "timeout": 2},
    }
    path = home.config_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, tiny_model, standin):
    """A home with a local instance `small` and three upstreams on the stand-in:
    `big` (2 at once, priced), `capped` (3 a minute), `pricey` (a tiny budget)."""
    from llama_orchestrator.daemon.main import stop

    root = tmp_path_factory.mktemp("upstreams")
    (root / "instances").mkdir()
    home = Home(root)
    router = free_port()
    home.settings_path.write_text(json.dumps({"router": {"port": router}}))
    write_config(home, "small", tiny_model, model={"alias": "small", "threads": 1})
    url = f"http://127.0.0.1:{standin.port}/v1"
    upstream(home, "big", url, max_concurrent=2, price=PRICE)
    upstream(home, "capped", url, requests_per_minute=3)
    upstream(home, "pricey", url, price={"output_per_mtok": 1e6}, budget={"per_day": 1.0})
    r = run_cli(home, "up", "--all", "--wait", env={KEY_ENV: KEY})
    assert r.returncode == 0, r.stderr
    wait_until(lambda: all(s == "healthy" for s in states(home).values()), timeout=20)
    yield home, f"http://127.0.0.1:{router}/v1"
    stop(home, all_=True)


def states(home: Home) -> dict[str, str]:
    return {r["name"]: r["state"] for r in json.loads(run_cli(home, "ps", "--json").stdout)}


def usage(home: Home) -> dict:
    r = run_cli(home, "usage", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_an_upstream_is_routed_to_by_alias_and_each_answer_counts_its_cost(fleet, standin):
    from openai import OpenAI

    home, url = fleet
    rows = {r["name"]: r for r in json.loads(run_cli(home, "ps", "--json").stdout)}
    assert rows["big"]["backend"] == "upstream" and rows["big"]["pid"] is None
    assert rows["big"]["upstream"]["url"].endswith("/v1") and rows["small"]["upstream"] is None
    from llama_orchestrator.tui.data import EngineSource

    source = EngineSource(home)  # the dashboard's view: the daemon's checks too
    try:
        seen = {v.name: v.status["state"] for v in source.snapshot().instances}
    finally:
        source.close()
    assert seen["big"] == "healthy" and seen["small"] == "healthy"
    client = OpenAI(base_url=url, api_key="unused", max_retries=0)
    before = len(standin.posts())
    answer = client.chat.completions.create(
        model="big", messages=[{"role": "user", "content": "hi"}], max_tokens=8
    )
    assert answer.choices[0].message.content == "OK"  # the stand-in's, not the local model's
    stream = client.chat.completions.create(
        model="big", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "OK"
    sent = standin.posts()[before:]
    assert [json.loads(s["body"])["model"] for s in sent] == ["remote-tiny", "remote-tiny"]
    assert json.loads(sent[1]["body"])["stream_options"] == {"include_usage": True}
    tin = 2 * answer.usage.prompt_tokens  # the same prompt twice
    tout = 2 * answer.usage.completion_tokens
    (big,) = wait_until(
        lambda: [r for r in usage(home)["rows"] if r["upstream"] == "big" and r["requests"] == 2]
    )
    assert (big["model"], big["tokens_in"], big["tokens_out"]) == ("remote-tiny", tin, tout)
    assert big["cost"] == pytest.approx((tin * 3.0 + tout * 15.0) / 1e6, rel=1e-6)
    text = run_cli(home, "usage").stdout
    assert "big" in text and "remote-tiny" in text and "total" in text
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(home.daemon_socket))) as c:
        metrics = c.get("http://llama-orch/metrics").text
    assert f'llama_orch_upstream_tokens_total{{direction="in",upstream="big"}} {tin:.1f}' in metrics
    assert (
        f'llama_orch_upstream_tokens_total{{direction="out",upstream="big"}} {tout:.1f}' in metrics
    )


def test_limits_queue_at_max_concurrent_and_refuse_past_the_rate_and_budget(fleet, standin):
    home, url = fleet
    standin.delay, standin.most = 0.3, 0
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    async def burst(n: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(
                *(
                    c.post(f"{url}/chat/completions", json={**body, "model": "big"})
                    for _ in range(n)
                )
            )

    try:
        answers = asyncio.run(burst(8))
    finally:
        standin.delay = 0.0
    assert [a.status_code for a in answers] == [200] * 8  # queued, none refused
    assert standin.most == 2  # never more than max_concurrent at the API
    codes = []
    for _ in range(5):
        r = httpx.post(f"{url}/chat/completions", json={**body, "model": "capped"}, timeout=30)
        codes.append(r.status_code)
        if r.status_code == 429:
            assert 0 < int(r.headers["retry-after"]) <= 60
            assert "3 requests a minute" in r.json()["error"]["message"]
    assert codes == [200, 200, 200, 429, 429]
    first = httpx.post(f"{url}/chat/completions", json={**body, "model": "pricey"}, timeout=30)
    assert first.status_code == 200  # costs more than the day's budget
    over = wait_until(
        lambda: (
            (
                r := httpx.post(f"{url}/chat/completions", json={**body, "model": "pricey"})
            ).status_code
            == 429
            and r
        )
    )
    assert "spent its budget of 1" in over.json()["error"]["message"]
    assert int(over.headers["retry-after"]) > 3600  # until that spending is a day old
    events = run_cli(home, "events", "pricey").stdout
    assert "budget_exceeded" in events


def test_the_key_is_sent_and_is_nowhere_else(fleet, standin):
    home, url = fleet
    assert standin.posts() and all(s["auth"] == f"Bearer {KEY}" for s in standin.seen)
    for path in home.root.rglob("*"):
        if path.is_file() and not path.is_socket():
            assert KEY.encode() not in path.read_bytes(), path
    args = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert KEY not in args
    d = run_cli(home, "describe", "big", "--json")
    assert d.returncode == 0 and KEY not in d.stdout
    assert json.loads(d.stdout)["config"]["upstream"]["api_key_env"] == KEY_ENV
    small = run_cli(home, "describe", "small", "--json").stdout
    assert KEY not in small and KEY_ENV not in small  # llama-server never gets it
    assert KEY not in run_cli(home, "events", "--json").stdout


def test_a_task_failing_its_check_twice_escalates_with_both_attempts_handed_over(
    fleet, standin, tmp_path
):
    home, _ = fleet
    plan = {
        "name": "escalate",
        "log_samples": True,
        "tasks": [
            {
                "id": "answer",
                "kind": "llm",
                "model": "small",
                "prompt": "Say OK.",
                "max_tokens": 8,
                "check": {"regex": "^OK$"},
                "escalate": {"to": "big", "after_failures": 2},
                "retries": 2,
                "backoff": 0,
            }
        ],
    }
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    before = len(standin.posts())
    r = run_cli(home, "plan", "run", str(path), "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    (sent,) = standin.posts()[before:]
    user = json.loads(sent["body"])["messages"][-1]["content"]
    for n in (1, 2):
        assert f'<untrusted_data source="attempt {n}">' in user
    assert "refused: its output does not match the check's regex '^OK$'" in user
    run_id = json.loads(run_cli(home, "plan", "list", "--json").stdout)[0]["id"]
    status = json.loads(run_cli(home, "plan", "status", run_id, "--json").stdout)
    (task,) = status["tasks"]
    assert (task["state"], task["attempts"], task["tier"]) == ("completed", 3, "external")
    assert task["instance"] == "big" and task["cost"] > 0
    assert run_cli(home, "plan", "status", run_id, "answer").stdout.strip() == "OK"
    assert "(external, cost " in run_cli(home, "plan", "status", run_id).stdout
    samples = home.plan_run_dir(run_id) / "samples.jsonl"
    lines = [json.loads(x) for x in samples.read_text().splitlines()]
    assert [(x["tier"], x["success"]) for x in lines] == [
        ("local", False),
        ("local", False),
        ("external", True),
    ]
    assert lines[2]["answer"] == "OK" and lines[2]["tokens"]["completion"] > 0
    assert "does not match" in lines[0]["error"] and lines[0]["prompt"][-1]["content"] == "Say OK."


def test_an_upstream_that_goes_down_is_marked_and_refused_fast_then_used_again(
    fleet, standin, tmp_path
):
    home, url = fleet
    standin.down()
    try:
        wait_until(lambda: states(home)["big"] == "unhealthy", timeout=15)
        r = httpx.post(
            f"{url}/chat/completions",
            json={"model": "big", "messages": [{"role": "user", "content": "hi"}]},
            timeout=30,
        )
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        plan = {
            "tasks": [
                {
                    "id": "t",
                    "kind": "llm",
                    "model": "small",
                    "tier": "external",
                    "escalate": {"to": "big"},
                    "prompt": "hi",
                    "max_tokens": 4,
                    "retries": 0,
                }
            ]
        }
        path = tmp_path / "needs-big.json"
        path.write_text(json.dumps(plan))
        r = run_cli(home, "plan", "run", str(path))  # it waits for big, taking no attempt
        assert r.returncode == 0 and "no healthy instance serves big" in r.stderr
        run_id = r.stdout.split()[0]
        time.sleep(1.0)  # a few turns of the plan runner with nothing to send it to
        (task,) = json.loads(run_cli(home, "plan", "status", run_id, "--json").stdout)["tasks"]
        assert (task["state"], task["attempts"]) == ("ready", 0)
        kinds = run_cli(home, "events", "big").stdout
        assert "upstream_unhealthy" in kinds
    finally:
        standin.up()
    wait_until(lambda: states(home)["big"] == "healthy", timeout=30)

    def task_of_run() -> dict:
        return json.loads(run_cli(home, "plan", "status", run_id, "--json").stdout)["tasks"][0]

    task = wait_until(lambda: (t := task_of_run())["state"] in ("completed", "failed") and t, 30)
    assert (task["state"], task["attempts"], task["tier"]) == ("completed", 1, "external")
    r = httpx.post(
        f"{url}/chat/completions",
        json={"model": "big", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        timeout=30,
    )
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "OK"


def test_an_upstream_refusing_the_key_on_requests_is_named_and_taken_out_of_service(fleet, standin):
    home, url = fleet
    ask = {"model": "big", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    standin.refuse = True
    try:
        r = httpx.post(f"{url}/chat/completions", json=ask, timeout=30)
        # not the upstream's own 401, which would tell the client its key is wrong
        assert r.status_code == 502, r.text
        message = r.json()["error"]["message"]
        assert "The upstream 'big' refused the key llama-orch sends it" in message
        assert "HTTP 401: Invalid API Key" in message and "api_key_env" in message
        # out of service for a check interval: said by an event (`ps` may come
        # after the hold on a loaded machine, so its state is not asserted)
        said = [json.loads(x) for x in run_cli(home, "events", "big", "--json").stdout.splitlines()]
        assert any(
            e["kind"] == "upstream_unhealthy" and "refused the key on a request" in e["message"]
            for e in said
        ), said
    finally:
        standin.refuse = False
    # its checks pass all along; it is tried again after its hold, and serves
    wait_until(lambda: states(home)["big"] == "healthy", timeout=30)
    r = httpx.post(f"{url}/chat/completions", json=ask, timeout=30)
    assert r.status_code == 200, r.text
