"""Interactive before batch, on the real llama-server: a 200-task plan and a
steady interactive load share one `parallel: 2` instance through the router."""

from __future__ import annotations

import json
import statistics
import threading
import time

import httpx
import pytest

from llama_orchestrator.daemon.info import running
from tests.helpers import free_port, run_cli, wait_until, write_config
from tests.integration.test_daemon import _raw
from tests.integration.test_plans import events, status, submit, write_plan

pytestmark = pytest.mark.integration

TASKS = 200


def test_interactive_requests_wait_less_than_a_big_plan_and_the_plan_still_finishes(
    home, tiny_model, tmp_path
):
    port = free_port()
    home.settings_path.write_text(json.dumps({"router": {"port": port}}))
    model = {"alias": "tiny", "threads": 1, "context_size": 1024}
    write_config(home, "one", tiny_model, model=model, server={"parallel": 2})
    assert run_cli(home, "up", "one").returncode == 0
    plan = write_plan(
        tmp_path,
        *[{"id": f"t{i}", "kind": "llm", "model": "tiny", "prompt": f"Count {i}", "max_tokens": 3}
          for i in range(TASKS)],
        name="big",
    )  # fmt: skip
    latencies: list[float] = []
    done = threading.Event()

    def client() -> None:  # a person at a chat window: one request after another
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", timeout=60) as c:
            while not done.is_set():
                t = time.perf_counter()
                r = c.post(
                    "/chat/completions",
                    json={"model": "tiny", "max_tokens": 3,
                          "messages": [{"role": "user", "content": "hi"}]},
                )  # fmt: skip
                assert r.status_code == 200, r.text
                latencies.append(time.perf_counter() - t)

    clients = [threading.Thread(target=client, daemon=True) for _ in range(2)]
    try:
        run_id = submit(home, plan)
        for c in clients:
            c.start()
        # batch is never starved: the plan finishes while the interactive load goes on
        wait_until(lambda: status(home, run_id)["state"] != "running", timeout=240, interval=0.5)
        done.set()
        for c in clients:
            c.join(timeout=60)
        assert status(home, run_id)["state"] == "completed"
        evs = events(home, run_id)
        created = min(e["ts"] for e in evs)
        started = {e["task"]: e["ts"] for e in evs if e.get("state") == "running"}
        assert len(started) == TASKS
        batch_wait = statistics.median(ts - created for ts in started.values())
        # a whole interactive request (its wait and its answer) against a batch task's wait
        assert len(latencies) >= 20
        assert statistics.median(latencies) < batch_wait, (statistics.median(latencies), batch_wait)
        text = _raw(running(home), "GET", "/metrics")[1]
        for cls in ("interactive", "batch"):
            assert f'llama_orch_router_queue_depth{{class="{cls}"}} 0.0' in text
        waited = {
            line.split('"')[1]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("llama_orch_router_queue_wait_seconds_count{")
        }
        assert waited.get("interactive", 0) > 0  # the plan kept both slots busy at times
    finally:
        done.set()
        run_cli(home, "down", "--all", "--timeout", "5")
