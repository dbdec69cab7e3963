"""The lifecycle engine against the real llama-server on the generated model."""

import httpx
import psutil
import pytest

from llama_orchestrator.engine.status import collect
from llama_orchestrator.errors import ConfigError, PortConflict, StartFailed
from llama_orchestrator.gpus.discover import Discovery
from llama_orchestrator.states import InstanceState as S
from tests.helpers import wait_until, write_config

pytestmark = pytest.mark.integration


def test_up_waits_for_health_and_the_server_answers(engine, control, home, tiny_model, server_bin):
    write_config(home, "a", tiny_model)
    (res,) = control.up(["a"], timeout=60)
    assert res.outcome == "started" and res.healthy
    r = httpx.post(
        f"http://127.0.0.1:{res.port}/completion",
        json={"prompt": "hi", "n_predict": 4, "ignore_eos": True},
    )
    assert r.status_code == 200 and r.json()["tokens_predicted"] == 4
    row = engine.store.get("a")
    assert row is not None and row.state == S.HEALTHY and row.pid == res.pid
    assert [e.kind for e in engine.store.events("a")] == ["starting", "healthy"]
    cmd = psutil.Process(res.pid).cmdline()
    assert cmd[0] == str(server_bin) and "--metrics" in cmd


def test_gpu_pinning_reaches_the_running_child_environment(engine, control, home, tiny_model):
    engine._find_gpus = lambda: Discovery("none", [])  # Vulkan not asked: no verdict on 0,3
    write_config(
        home, "split", tiny_model, gpu={"backend": "vulkan", "device_id": [0, 3], "layers": 99}
    )
    # no GPU here: without `force` the pin is refused (see the test below)
    write_config(home, "one", tiny_model, gpu={"backend": "cuda", "device_id": 2, "force": True})
    results = {r.name: r for r in control.up(["split", "one"], timeout=60)}
    env_split = psutil.Process(results["split"].pid).environ()
    env_one = psutil.Process(results["one"].pid).environ()
    assert env_split["GGML_VK_VISIBLE_DEVICES"] == "0,3"
    assert env_one["CUDA_VISIBLE_DEVICES"] == "2" and env_one["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env_split["LLAMA_ORCH_INSTANCE"] == "split"
    cmd = psutil.Process(results["split"].pid).cmdline()
    assert cmd[cmd.index("-ngl") + 1] == "99"


def test_a_pin_on_a_machine_without_gpus_is_refused_unless_forced(
    engine, control, home, tiny_model
):
    engine._find_gpus = lambda: Discovery("none", [])  # a machine without GPU tools
    write_config(home, "g", tiny_model, gpu={"backend": "cuda", "device_id": 0})
    with pytest.raises(ConfigError) as exc:
        control.up(["g"], timeout=60)
    assert "GPU 0 is pinned but no GPU was found here" in str(exc.value)
    assert "gpu.force" in str(exc.value) and engine.store.get("g") is None  # nothing started


def test_api_key_is_in_the_child_env_not_its_argv(engine, control, home, tiny_model):
    write_config(home, "k", tiny_model, server={"api_key": "sk-test-123"})
    (res,) = control.up(["k"], timeout=60)
    proc = psutil.Process(res.pid)
    assert "sk-test-123" not in " ".join(proc.cmdline())
    assert proc.environ()["LLAMA_API_KEY"] == "sk-test-123"
    url = f"http://127.0.0.1:{res.port}/v1/models"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer sk-test-123"}).status_code == 200


def test_down_stops_the_process_and_records_it(engine, control, home, tiny_model):
    write_config(home, "a", tiny_model)
    (res,) = control.up(["a"], timeout=60)
    assert control.down(["a"]) == ["a"]
    assert (
        not psutil.pid_exists(res.pid) or psutil.Process(res.pid).status() == psutil.STATUS_ZOMBIE
    )
    row = engine.store.get("a")
    assert row is not None and row.state == S.STOPPED and row.exit_code == 0
    assert control.down(["a"]) == []  # stopping a stopped instance is a no-op


def test_up_of_a_running_instance_starts_nothing_new(engine, control, home, tiny_model):
    write_config(home, "a", tiny_model)
    (first,) = control.up(["a"], timeout=60)
    (second,) = control.up(["a"], timeout=60)
    assert second.outcome == "already running" and second.pid == first.pid and not second.stale
    cfg_path = home.config_path("a")
    cfg_path.write_text(cfg_path.read_text().replace('"context_size": 512', '"context_size": 256'))
    (third,) = control.up(["a"], timeout=60)
    assert third.outcome == "already running" and third.pid == first.pid and third.stale


def test_server_exiting_at_once_fails_with_code_and_stderr(engine, control, home, tiny_model):
    write_config(home, "bad", tiny_model, server={"extra_args": ["--no-such-flag"]})
    with pytest.raises(StartFailed) as info:
        control.up(["bad"], timeout=60)
    msg = str(info.value)
    assert "Instance 'bad' exited with code 1 while starting" in msg
    assert "--no-such-flag" in msg  # llama-server's own complaint, from its stderr
    row = engine.store.get("bad")
    assert row is not None and row.state == S.EXITED and row.exit_code == 1
    assert row.last_exit and row.last_exit["stderr_tail"]


def test_a_port_held_by_a_foreign_process_is_refused(engine, control, home, tiny_model):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        write_config(home, "a", tiny_model, server={"port": s.getsockname()[1]})
        with pytest.raises(PortConflict, match="already in use by another program"):
            control.up(["a"], timeout=10)
    assert engine.store.get("a") is None  # nothing half-written


def test_one_bad_config_starts_nothing(engine, control, home, tiny_model, tmp_path):
    write_config(home, "good", tiny_model)
    write_config(home, "bad", tmp_path / "missing.gguf")
    with pytest.raises(ConfigError, match="missing.gguf does not exist"):
        control.up(["good", "bad"])
    assert engine.store.all() == []


def test_death_is_observed_with_the_signal(engine, control, home, tiny_model):
    write_config(home, "a", tiny_model)
    (res,) = control.up(["a"], timeout=60)
    psutil.Process(res.pid).kill()
    rows = wait_until(lambda: [r for r in collect(engine) if r["state"] == "exited"])
    assert rows[0]["last_exit"]["signal"] == 9 and rows[0]["pid"] is None
    assert rows[0]["exit_code"] == -9


def test_stop_kills_a_tree_that_ignores_sigterm_after_stop_timeout(
    engine, control, home, tiny_model, fake_bin
):
    write_config(
        home,
        "stubborn",
        tiny_model,
        binary=str(fake_bin),
        stop_timeout=0.5,
        env={"FAKE_IGNORE_SIGTERM": "1", "FAKE_CHILD": "1"},
    )
    (res,) = control.up(["stubborn"], timeout=30)
    root = psutil.Process(res.pid)
    tree = [root, *wait_until(lambda: root.children(recursive=True))]
    assert control.down(["stubborn"]) == ["stubborn"]
    assert all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in tree)
    ev = engine.store.events("stubborn")[-1]
    assert ev.kind == "stopped" and ev.data["graceful"] is False


def test_logs_of_a_running_instance_rotate_when_someone_looks(engine, control, home, tiny_model):
    home.settings_path.write_text('{"logs": {"max_bytes": 4096, "backups": 2}}')
    write_config(home, "a", tiny_model)
    (res,) = control.up(["a"], timeout=60)
    stderr = home.log_dir("a") / "stderr.log"
    with open(stderr, "ab") as f:  # as if the server had been chatty for a long time
        f.write(b"x" * 10_000 + b"\n")
    collect(engine)  # what `ps` does
    assert stderr.stat().st_size < 4096
    assert (home.log_dir("a") / "stderr.log.1").stat().st_size > 10_000
    # the server keeps writing into the truncated file through its own fd
    httpx.post(f"http://127.0.0.1:{res.port}/completion", json={"prompt": "hi", "n_predict": 2})
    wait_until(lambda: stderr.stat().st_size > 0)
    assert b"\0" not in stderr.read_bytes()  # appended at the new end, no hole
