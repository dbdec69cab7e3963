from llama_orchestrator.cli.lifecycle_cmd import _log_message
from llama_orchestrator.engine.results import exit_text


def test_exit_text_names_signals_codes_and_the_unknown():
    assert exit_text({"code": None, "signal": 9}) == "was killed by signal 9 (SIGKILL)"
    assert exit_text({"code": 1, "signal": None}) == "exited with code 1"
    assert exit_text({"code": 0, "signal": None}) == "exited with code 0"
    assert "exit code unknown" in exit_text({"code": None, "signal": None})


def test_log_message_strips_llama_cpp_prefix_and_cuts_at_the_end():
    line = "0.01.072.502 I srv    load_model: initializing, n_slots = 2"
    assert _log_message(line) == "load_model: initializing, n_slots = 2"
    assert _log_message("plain warning text") == "plain warning text"
    cut = _log_message("x" * 100, width=10)
    assert cut == "x" * 9 + "…"


def test_columns_pads_like_docker_ps_and_colours_only_when_asked():
    from llama_orchestrator.present import columns

    text = columns(
        ["NAME", "STATE", "MODEL"],
        [["a", "healthy*", "m.gguf"], ["long-name", "exited", "x"]],
        ["green", "red"],
    )
    assert text.splitlines() == [
        "NAME       STATE     MODEL",
        "a          healthy*  m.gguf",
        "long-name  exited    x",
    ]
    coloured = columns(["NAME", "STATE"], [["a", "failed"]], ["bold red"], color=True)
    assert coloured.splitlines()[1] == "a     \x1b[1;31mfailed\x1b[0m"


def test_dashboard_row_for_an_instance_in_backoff():
    from llama_orchestrator.tui.cells import cells
    from llama_orchestrator.tui.data import InstanceView
    from tests.fakes.fake_source import status

    s = status(
        "qwen",
        "backoff",
        8002,
        None,
        restarts=3,
        supervised=True,
        next_restart_at="2026-11-22T06:30:15+00:00",
        gpu_devices=[0, 3],
    )
    row = [str(c) for c in cells(InstanceView(s))]
    assert row == [
        "qwen",
        "backoff",
        "-",
        "-",
        "8002",
        "qwen",
        "cuda:0,3",
        "3",
        "-",
        "-",
        "-",
        "-",
        "-",
        "06:30:15",
    ]


def test_on_demand_state_countdown_and_ps_column():
    from dataclasses import replace

    from llama_orchestrator.cli.inspect_cmd import ps_table
    from llama_orchestrator.config.instance import InstanceConfig
    from llama_orchestrator.engine.status import status_view
    from llama_orchestrator.present import on_demand_line, state_label
    from llama_orchestrator.states import Desired
    from llama_orchestrator.states import InstanceState as S
    from llama_orchestrator.store.rows import InstanceRow

    cfg = InstanceConfig.model_validate(
        {"model": {"path": "m.gguf"}, "server": {"port": 8001}, "on_demand": {"idle_ttl": 300}}
    )
    always = cfg.model_copy(update={"on_demand": None})
    stopped = InstanceRow("od", last_used_at=1000.0)
    running = InstanceRow(
        "od", Desired.RUNNING, S.HEALTHY, pid=7, started_at=900.0, last_used_at=1000.0,
        supervised=True,
    )  # fmt: skip
    idle = status_view("od", cfg, stopped, now=1060.0)
    busy = status_view("od", cfg, running, now=1060.0)
    plain = status_view("od", always, running, now=1060.0)
    assert (idle["on_demand"], idle["last_used_at"], idle["idle_stop_in_s"]) == (
        True,
        "1970-01-01T00:16:40+00:00",
        None,
    )
    assert busy["idle_stop_in_s"] == 240.0  # 300 s from the last use, 60 s ago
    assert (plain["on_demand"], plain["idle_stop_in_s"]) == (False, None)
    assert state_label(idle) == "idle (on demand)"
    assert state_label(busy) == "healthy (idle stop 4m00s)"
    assert state_label(plain) == "healthy"
    no_daemon = status_view("od", cfg, replace(running, supervised=False), now=1060.0)
    assert no_daemon["idle_stop_in_s"] is None  # only the daemon stops idle instances
    assert on_demand_line(busy, 300, now=1060.0) == (
        "idle stop after 300s; last used 1m00s ago; stops in 4m00s"
    )
    assert on_demand_line(plain, None, now=1060.0) is None
    table = ps_table([idle, busy], now=1060.0).splitlines()
    assert table[0].split() == [
        "NAME", "STATE", "PID", "PORT", "ALIAS", "BACKEND", "RESTARTS", "UPTIME", "LAST", "USED",
        "MODEL",
    ]  # fmt: skip
    assert "idle (on demand)" in table[1] and "1m00s ago" in table[1]
    assert "LAST USED" not in ps_table([plain], now=1060.0)  # only when any is on demand


def test_ps_json_gives_the_last_exit_time_in_iso_8601_like_every_other_time():
    from llama_orchestrator.config.instance import InstanceConfig
    from llama_orchestrator.engine.status import status_view
    from llama_orchestrator.store.rows import InstanceRow

    cfg = InstanceConfig.model_validate({"model": {"path": "m.gguf"}, "server": {"port": 8001}})
    ended = InstanceRow(
        "a", exit_code=1, last_exit={"code": 1, "signal": None, "at": 1000.0, "stderr_tail": []}
    )
    view = status_view("a", cfg, ended, now=1060.0)
    assert view["last_exit"]["at"] == "1970-01-01T00:16:40+00:00"
    assert view["last_exit"]["code"] == 1 and ended.last_exit["at"] == 1000.0  # row untouched
    assert status_view("a", cfg, InstanceRow("a"), now=0)["last_exit"] is None


def test_a_queued_or_loading_instance_says_its_place_in_line_and_how_far_it_loaded():
    from llama_orchestrator.config.instance import InstanceConfig
    from llama_orchestrator.engine.logs import dots_percent
    from llama_orchestrator.engine.status import status_view, with_loads
    from llama_orchestrator.present import state_label
    from llama_orchestrator.states import Desired
    from llama_orchestrator.states import InstanceState as S
    from llama_orchestrator.store.rows import InstanceRow

    cfg = InstanceConfig.model_validate({"model": {"path": "m.gguf"}, "server": {"port": 8001}})
    queued = status_view("q", cfg, InstanceRow("q", Desired.RUNNING, S.QUEUED), now=5.0)
    loading = status_view(
        "l", cfg, InstanceRow("l", Desired.RUNNING, S.STARTING, pid=7, started_at=1.0,
                              supervised=True), now=5.0, load_percent=42,
    )  # fmt: skip
    assert state_label(queued) == "queued"  # no daemon to say where in line
    with_loads([queued, loading], {"q": [2, 5], "l": [1, 5]})
    assert (queued["load_position"], loading["load_position"]) == ([2, 5], [1, 5])
    assert state_label(queued) == "queued (load 2 of 5)"
    assert state_label(loading) == "starting (42%)"
    loading["load_progress"] = 100  # read: it warms up, nothing more to count
    assert state_label(loading) == "starting"
    # llama.cpp's dots, one per percent read; a finished line is 100 %
    head = "--- llama-orch: process started at 2026-01-01T00:00:00+00:00 ---\nload_tensors: x\n"
    assert dots_percent(head + "." * 37) == 37
    assert dots_percent(head + "." * 100 + "\nllama_context: y\n") == 100
    assert dots_percent(head + "no dots yet") is None
    assert dots_percent("." * 80 + "\n" + head) is None  # an earlier run's dots do not count


def test_daemon_status_says_of_each_peer_whether_it_answers():
    from llama_orchestrator.present import peer_line

    url = "http://10.0.0.2:8080"
    two = {"url": url, "state": "reachable", "instances": [{}, {}]}
    assert peer_line("rig2", two) == f"rig2 ({url}): answers, 2 healthy instances"
    one = {**two, "instances": [{}]}
    assert peer_line("rig2", one).endswith("answers, 1 healthy instance")
    away = {"url": url, "state": "unreachable", "error": "no answer within 2s"}
    assert peer_line("rig2", away) == f"rig2 ({url}): does not answer: no answer within 2s"
    assert peer_line("rig2", {"url": url, "state": "checking"}) == f"rig2 ({url}): not asked yet"
