"""GPU leases for plans' script tasks, on the real llama-server and daemon: a
fake nvidia-smi reports one 6 GB card, held by an instance (a CPU build of
llama-server runs on the CPU whatever CUDA_VISIBLE_DEVICES says, which is all
the decisions need); the script is a real process that reports what it sees."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import httpx
import pytest

from llama_orchestrator.daemon.info import running
from llama_orchestrator.home import Home
from llama_orchestrator.store.database import Store
from tests.helpers import free_port, run_cli, wait_until, write_config
from tests.integration.test_on_demand import ONE_6GB_CARD
from tests.integration.test_plans import status, submit, tasks_of, write_plan

pytestmark = pytest.mark.integration

FAKES = Path(__file__).parents[1] / "fakes"
NO_NVML = str(FAKES / "no_nvml")  # NVML absent whatever is installed
BARE_PATH = str(Path(sys.executable).parent)  # no nvidia-smi, rocm-smi nor vulkaninfo

#: the script: what it was given, whether the instance still listens, then a pause
SCRIPT = """
import os, socket, sys, time
seen = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES",
                                       "GGML_VK_VISIBLE_DEVICES")}
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
    seen["instance"] = "listening"
except OSError:
    seen["instance"] = "stopped"
print(seen, flush=True)
time.sleep(float(sys.argv[2]))
"""


def setup(home: Home, tiny_model, may_yield: bool) -> tuple[int, str]:
    router = free_port()
    home.settings_path.write_text(json.dumps({"router": {"port": router}}))
    path = write_config(
        home,
        "big",
        tiny_model,
        model={"alias": "big", "threads": 1},
        gpu={"backend": "cuda", "device_id": 0},
        healthcheck={"interval": 0.5},
        yield_to_scripts=may_yield,
    )
    port = json.loads(path.read_text())["server"]["port"]
    r = run_cli(home, "up", "big", env=ONE_6GB_CARD)  # the daemon sees the one card
    assert r.returncode == 0, r.stderr
    return port, f"http://127.0.0.1:{router}"


def plan(tmp_path, port: int, pause: float):
    return write_plan(
        tmp_path,
        {"id": "asr", "kind": "script", "gpus": 1, "timeout": 60,
         "command": [sys.executable, "-c", SCRIPT, str(port), str(pause)]},
        name="transcribe",
    )  # fmt: skip


def gpus(home: Home) -> dict:
    r = run_cli(home, "gpus", "--json", env=ONE_6GB_CARD)
    assert r.returncode == 0, r.stderr
    (card,) = json.loads(r.stdout)
    return card


def ps(home: Home) -> dict:
    return {x["name"]: x for x in json.loads(run_cli(home, "ps", "--json").stdout)}


def kinds(home: Home) -> list[str]:
    store = Store.open(home.db_path)
    try:
        return [e.kind for e in store.events()]
    finally:
        store.close()


def test_a_script_task_gets_the_card_its_idle_instance_yields_and_the_instance_comes_back(
    home, tiny_model, tmp_path
):
    port, url = setup(home, tiny_model, may_yield=True)
    before = ps(home)["big"]["pid"]
    assert gpus(home)["state"] == "llm_ready"
    try:
        run_id = submit(home, plan(tmp_path, port, pause=3))
        card = wait_until(lambda: (c := gpus(home))["state"] == "script_busy" and c, timeout=30)
        assert card["lease"]["task"] == "asr" and card["lease"]["plan"] == run_id
        assert ps(home)["big"]["state"] == "stopped"  # drained and stopped, like down
        table = run_cli(home, "gpus", env={**ONE_6GB_CARD, "COLUMNS": "200"}).stdout
        assert "script_busy" in table and f"asr (plan {run_id})" in table
        answer: dict = {}

        def ask() -> None:  # a request for the yielded model waits for its return
            body = {
                "model": "big",
                "max_tokens": 2,
                "messages": [{"role": "user", "content": "hi"}],
            }
            answer["status"] = httpx.post(
                f"{url}/v1/chat/completions", json=body, timeout=60
            ).status_code

        asker = threading.Thread(target=ask)
        asker.start()
        wait_until(lambda: status(home, run_id)["state"] == "completed", timeout=60)
        asker.join(timeout=60)
        assert answer == {"status": 200}  # never a stopped server, never a refusal
        said = (home.root / "plans" / run_id / "asr.out").read_text()
        seen = eval(said.strip())  # noqa: S307 - our own script's repr
        assert seen == {
            "CUDA_VISIBLE_DEVICES": "0",
            "HIP_VISIBLE_DEVICES": "0",
            "GGML_VK_VISIBLE_DEVICES": "0",
            "instance": "stopped",  # nothing else ran on the card meanwhile
        }
        after = wait_until(lambda: (x := ps(home)["big"])["state"] == "healthy" and x, timeout=30)
        assert after["pid"] != before and gpus(home)["lease"] is None
        order = [k for k in kinds(home) if k.startswith(("lease_", "instance_"))]
        assert order == ["lease_granted", "instance_yielded", "lease_released", "instance_restored"]
    finally:
        run_cli(home, "down", "--all", "--timeout", "5")


def test_a_daemon_killed_mid_lease_gives_the_card_back_and_restores_the_instance(
    home, tiny_model, tmp_path
):
    port, _ = setup(home, tiny_model, may_yield=True)
    try:
        run_id = submit(home, plan(tmp_path, port, pause=3))
        wait_until(lambda: gpus(home)["state"] == "script_busy", timeout=30)
        info = running(home)
        assert info is not None
        os.kill(info.pid, signal.SIGKILL)
        wait_until(lambda: running(home) is None, timeout=10)
        assert gpus(home)["lease"]["task"] == "asr"  # persisted: the card is not lost
        r = run_cli(home, "daemon", "start", env=ONE_6GB_CARD)
        assert r.returncode == 0, r.stderr
        # the lease given back and the instance restored; the task ran again and finished
        wait_until(lambda: status(home, run_id)["state"] == "completed", timeout=60)
        wait_until(lambda: ps(home)["big"]["state"] == "healthy", timeout=30)
        assert gpus(home)["lease"] is None
        assert tasks_of(home, run_id)["asr"]["attempts"] >= 1
        assert "daemon restarted" in " ".join(
            e.message for e in Store.open(home.db_path).events() if e.kind == "lease_released"
        )
    finally:
        run_cli(home, "down", "--all", "--timeout", "5")


def test_a_script_task_waits_for_a_card_whose_instance_does_not_yield_and_says_why(
    home, tiny_model, tmp_path
):
    port, _ = setup(home, tiny_model, may_yield=False)
    before = ps(home)["big"]["pid"]
    try:
        run_id = submit(home, plan(tmp_path, port, pause=0))
        task = wait_until(lambda: (t := tasks_of(home, run_id)["asr"])["error"] and t, timeout=30)
        assert task["state"] == "ready"
        assert task["error"].startswith("waiting for a GPU: GPU 0 is held by instance 'big'")
        assert '"yield_to_scripts": true' in task["error"]
        text = run_cli(home, "plan", "status", run_id).stdout
        assert "waiting for a GPU" in text
        big = ps(home)["big"]
        assert big["state"] == "healthy" and big["pid"] == before  # left alone
        assert run_cli(home, "plan", "cancel", run_id).returncode == 0
        assert "lease_granted" not in kinds(home)
    finally:
        run_cli(home, "down", "--all", "--timeout", "5")


def test_a_cpu_instance_that_still_names_a_device_holds_no_card(home, tiny_model, tmp_path):
    home.settings_path.write_text(json.dumps({"router": {"port": free_port()}}))
    # validation says device_id is ignored with backend cpu: so is it for leases
    path = write_config(home, "c", tiny_model, model={"threads": 1}, gpu={"device_id": 0})
    port = json.loads(path.read_text())["server"]["port"]
    try:
        r = run_cli(home, "up", "c", env=ONE_6GB_CARD)
        assert r.returncode == 0, r.stderr
        assert "gpu.device_id: is ignored with backend 'cpu'" in r.stderr
        run_id = submit(home, plan(tmp_path, port, pause=0))
        done = wait_until(lambda: status(home, run_id)["state"] == "completed", timeout=30)
        assert done
        task = tasks_of(home, run_id)["asr"]
        assert task["attempts"] == 1 and not task["error"]
        c = ps(home)["c"]
        assert c["state"] == "healthy" and c["gpu_devices"] == []  # never asked to yield
    finally:
        run_cli(home, "down", "--all", "--timeout", "5")


@pytest.mark.parametrize(
    ("gpus", "env", "why"),
    [
        ([3], ONE_6GB_CARD, "GPU 3 is not on this machine (it has GPU 0)"),
        (2, ONE_6GB_CARD, "it needs 2 GPUs and this machine has 1"),
        (1, {"PYTHONPATH": NO_NVML, "PATH": BARE_PATH}, "no GPU was found on this machine"),
    ],
)
def test_a_script_task_asking_for_cards_the_machine_lacks_is_refused_at_plan_run(
    home, tmp_path, gpus, env, why
):
    home.settings_path.write_text(json.dumps({"router": {"port": free_port()}}))
    path = write_plan(
        tmp_path,
        {"id": "asr", "kind": "script", "gpus": gpus, "command": [sys.executable, "-c", "1"]},
    )
    try:
        r = run_cli(home, "plan", "run", str(path), "--wait", env=env)
        assert r.returncode == 2, r.stdout + r.stderr
        assert f"GPUs this machine does not have: task 'asr': {why}." in r.stderr
        assert json.loads(run_cli(home, "plan", "list", "--json").stdout) == []  # nothing ran
    finally:
        run_cli(home, "daemon", "stop")


def test_a_waiting_script_task_fails_when_its_card_is_gone(home, tiny_model, tmp_path):
    card = tmp_path / "nvidia-smi.csv"  # what the fake nvidia-smi reports, changed below
    card.write_text((FAKES / "gpu_outputs" / "one_6gb.csv").read_text())
    env = {**ONE_6GB_CARD, "FAKE_NVIDIA_SMI": str(card)}
    home.settings_path.write_text(json.dumps({"router": {"port": free_port()}}))
    gpu = {"backend": "cuda", "device_id": 0}
    write_config(home, "big", tiny_model, model={"threads": 1}, gpu=gpu)
    try:
        assert run_cli(home, "up", "big", env=env).returncode == 0
        path = write_plan(
            tmp_path,
            {"id": "asr", "kind": "script", "gpus": 1, "command": [sys.executable, "-c", "1"]},
        )
        r = run_cli(home, "plan", "run", str(path), env=env)
        assert r.returncode == 0, r.stderr
        run_id = r.stdout.split()[0]
        wait_until(
            lambda: "held by instance 'big'" in (tasks_of(home, run_id)["asr"]["error"] or "")
        )
        card.write_text("")  # the card is gone (off the bus, say)
        done = wait_until(lambda: status(home, run_id)["state"] == "failed", timeout=30)
        assert done
        task = tasks_of(home, run_id)["asr"]
        assert task["error"] == "no GPU here can run it: no GPU was found on this machine"
    finally:
        run_cli(home, "down", "--all", "--timeout", "5")
