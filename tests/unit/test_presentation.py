from llama_orchestrator.cli.lifecycle import _log_message
from llama_orchestrator.engine.lifecycle import exit_text


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
    from llama_orchestrator.tui.app import cells
    from llama_orchestrator.tui.data import InstanceView
    from tests.tui.fake_source import status

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
