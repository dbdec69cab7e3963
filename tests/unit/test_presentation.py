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
