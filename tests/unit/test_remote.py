"""`--host ssh://…` and contexts: the pure parts (addresses, ssh's command
line, the payload, what ssh's failures mean) by example, and the context
store on a real folder. The real ssh is tests/integration/test_hosts.py's."""

from __future__ import annotations

import base64
import json

import pytest
from typer.testing import CliRunner

from llama_orchestrator import __version__
from llama_orchestrator.cli.app import _elsewhere, app, main
from llama_orchestrator.errors import UserError
from llama_orchestrator.hosts.contexts import Context, Contexts, choose
from llama_orchestrator.hosts.ssh import (
    MARKER,
    SshTarget,
    decode_payload,
    encode_payload,
    parse_target,
    split_root_args,
    ssh_argv,
    ssh_failure,
    version_mismatch,
)


def test_ssh_addresses_are_parsed_and_bad_ones_named():
    t = parse_target("ssh://me@rig2:2222/srv/llm")
    assert (t.user, t.host, t.port, t.home) == ("me", "rig2", 2222, "/srv/llm")
    assert t.destination == "me@rig2" and t.url == "ssh://me@rig2:2222/srv/llm"
    t = parse_target("ssh://rig2")
    assert (t.user, t.port, t.home, t.name) == (None, None, None, "rig2")
    assert parse_target("ssh://[fd00::2]:22/").host == "fd00::2"
    assert parse_target("ssh://a%40b@h/my%20home").user == "a@b"
    assert parse_target("ssh://h/my%20home").home == "/my home"
    for bad, says in [
        ("rig2", "not an ssh:// address"),
        ("http://rig2", "not an ssh:// address"),
        ("ssh://rig2:99999", "port"),
        ("ssh://rig2:x", "port"),
        ("ssh://u:pw@rig2", "not one llama-orch can reach"),
        ("ssh://", "not one llama-orch can reach"),
        ("ssh://-oProxyCommand=x", "'-'"),
    ]:
        with pytest.raises(UserError) as exc:
            parse_target(bad)
        assert says in str(exc.value), bad
        assert exc.value.exit_code == 2


def test_the_payload_is_one_shell_safe_word_that_comes_back_whole():
    argv = ["init", "x", "--model", "/m/a b.gguf", "--", "--flag='$(rm -rf /)'", "ü;|&"]
    word = encode_payload(argv, "rig2")
    assert set(word) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=")
    assert decode_payload(word) == (__version__, argv, "rig2")
    for junk in ["x", base64.urlsafe_b64encode(b"[1]").decode()]:
        with pytest.raises(UserError):
            decode_payload(junk)
    not_strings = base64.urlsafe_b64encode(json.dumps({"version": "1", "argv": [1]}).encode())
    with pytest.raises(UserError, match="list of strings"):
        decode_payload(not_strings.decode())


def test_a_version_that_differs_is_one_sentence_naming_what_to_install():
    assert version_mismatch("1.0", "1.0", "rig2") is None
    says = version_mismatch("1.1", "1.0", "rig2")
    assert says is not None and "rig2 runs llama-orch 1.0" in says and "==1.1" in says


def test_ssh_gets_a_terminal_only_with_one_and_never_a_prompt_without():
    t = SshTarget("rig2", "me", 2222, command="/opt/venv/bin/llama-orch")
    argv = ssh_argv(t, "WORD", tty=False)
    assert argv[:2] == ["ssh", "-T"] and "BatchMode=yes" in argv
    # a machine that is gone ends the connection in ~15 s, not TCP's minutes
    assert "ServerAliveInterval=5" in argv and "ServerAliveCountMax=3" in argv
    assert argv[argv.index("-p") + 1] == "2222"
    assert argv[argv.index("--") :] == [
        "--",
        "me@rig2",
        "/opt/venv/bin/llama-orch",
        "system",
        "remote",
        "WORD",
    ]
    argv = ssh_argv(SshTarget("rig2"), "WORD", tty=True, ssh_command="ssh -F '/my cfg'")
    assert argv[:4] == ["ssh", "-F", "/my cfg", "-t"] and "BatchMode=yes" not in argv
    assert "-p" not in argv


def test_host_is_taken_from_the_root_options_only():
    assert split_root_args(["--host", "ssh://h", "ps", "--json"]) == (
        "ssh://h",
        ["ps", "--json"],
        "ps",
    )
    assert split_root_args(["--home", "/x", "--host=ssh://h", "--debug", "up", "a"]) == (
        "ssh://h",
        ["--home", "/x", "--debug", "up", "a"],
        "up",
    )
    # an instance's own `--host` (of init) is the command's, not ours
    assert split_root_args(["init", "a", "--host", "0.0.0.0"]) == (
        None,
        ["init", "a", "--host", "0.0.0.0"],
        "init",
    )
    assert split_root_args(["--version"]) == (None, ["--version"], None)


# stderr as OpenSSH 9 writes it (recorded from real failures)
CHANGED = """\
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!
Host key for [10.77.0.2]:2222 has changed and you have requested strict checking.
Host key verification failed.
"""


@pytest.mark.parametrize(
    ("rc", "stderr", "started", "says", "code"),
    [
        (255, CHANGED, False, "has changed since it was recorded", 2),
        (255, "Host key verification failed.\n", False, "is not known yet", 2),
        (
            255,
            "root@10.77.0.2: Permission denied (publickey).\n",
            False,
            "refused the SSH login for me@rig2",
            2,
        ),
        (
            255,
            "ssh: Could not resolve hostname rig2: Name or service not known\n",
            False,
            "could not be resolved",
            2,
        ),
        (
            255,
            "ssh: connect to host rig2 port 22: Connection refused\n",
            False,
            "no SSH server listens",
            1,
        ),
        (
            255,
            "ssh: connect to host rig2 port 22: Connection timed out\n",
            False,
            "cannot be reached over SSH (connect to host rig2 port 22: Connection timed out)",
            1,
        ),
        (255, "", True, "connection to rig2 was lost while the command ran", 1),
        (255, "Connection to rig2 closed by remote host.\n", False, "cannot be reached", 1),
        (
            255,
            "kex_exchange_identification: banner line contains invalid characters\n",
            False,
            "ssh to rig2 failed: kex_exchange",
            1,
        ),
        (
            127,
            "bash: line 1: llama-orch: command not found\n",
            False,
            "has no `llama-orch` that ssh can run",
            2,
        ),
        (
            1,
            "'llama-orch' is not recognized as an internal or external command\n",
            False,
            "has no `llama-orch`",
            2,
        ),
    ],
)
def test_what_ssh_failures_mean(rc, stderr, started, says, code):
    problem = ssh_failure(SshTarget("rig2", "me"), rc, stderr, started)
    assert problem is not None and says in str(problem), str(problem)
    assert problem.exit_code == code
    assert "\n" not in str(problem)


def test_the_remote_commands_own_exit_codes_are_no_ssh_failure():
    t = SshTarget("rig2")
    assert ssh_failure(t, 0, "", started=True) is None
    assert ssh_failure(t, 2, "Warning: Permanently added 'rig2' (ED25519)\n", started=True) is None
    assert ssh_failure(t, 1, "", started=False) is None  # under -t nothing marks the start


def test_contexts_are_created_used_and_removed(tmp_path):
    store = Contexts(tmp_path)
    assert store.current() == "default" and store.all() == []
    store.create(Context("rig2", "ssh://me@rig2/srv", description="the GPU box"))
    with pytest.raises(UserError, match="exists already"):
        store.create(Context("rig2", "ssh://me@rig3"))
    store.create(Context("rig2", "ssh://me@rig3", "/v/bin/llama-orch"), force=True)
    for bad in [Context("default", "ssh://h"), Context("Bad Name", "ssh://h"), Context("ok", "h")]:
        with pytest.raises(UserError):
            store.create(bad)
    assert [c.name for c in store.all()] == ["rig2"]
    store.use("rig2")
    assert store.current() == "rig2"
    target = store.get("rig2").target()  # type: ignore[union-attr]
    assert (target.host, target.command, target.name) == ("rig3", "/v/bin/llama-orch", "rig2")
    with pytest.raises(UserError, match="no context 'nope' .*default, rig2"):
        store.use("nope")
    store.remove("rig2")
    assert store.current() == "default" and store.all() == []
    with pytest.raises(UserError, match="cannot be removed"):
        store.remove("default")
    (tmp_path / "contexts.json").write_text("{nope")
    with pytest.raises(UserError, match="cannot be read as JSON"):
        store.current()


def test_which_machine_a_command_runs_on(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("LLAMA_ORCH_HOST", raising=False)
    monkeypatch.delenv("LLAMA_ORCH_CONTEXT", raising=False)
    Contexts().create(Context("rig2", "ssh://me@rig2"))
    assert choose(None) is None  # the default context: here
    assert choose("ssh://other").host == "other"  # type: ignore[union-attr]
    assert choose("rig2").name == "rig2"  # type: ignore[union-attr]  # a context's name
    assert choose(None, {"LLAMA_ORCH_HOST": "ssh://envhost"}).host == "envhost"  # type: ignore[union-attr]
    assert choose(None, {"LLAMA_ORCH_CONTEXT": "rig2"}).name == "rig2"  # type: ignore[union-attr]
    Contexts().use("rig2")
    assert choose(None).name == "rig2"  # type: ignore[union-attr]
    assert choose(None, {"LLAMA_ORCH_CONTEXT": "default"}) is None
    # help, the version, and what is about this machine never leave it
    for args in (["--version"], ["--help"], ["context", "ls"], ["system", "remote", "x"], []):
        assert _elsewhere(args) is None, args
    assert _elsewhere(["ps"]).name == "rig2"  # type: ignore[union-attr]


def test_context_commands_and_a_remote_call_of_another_version(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    run = CliRunner().invoke
    r = run(app, ["context", "create", "rig2", "--host", "ssh://me@rig2"])
    assert r.exit_code == 0, r.output
    r = run(app, ["context", "create", "rig3", "--host", "rig3"])
    assert isinstance(r.exception, UserError) and "not an ssh:// address" in str(r.exception)
    r = run(app, ["context", "use", "rig2"])
    assert r.exit_code == 0
    r = run(app, ["context", "ls", "--json"])
    rows = json.loads(r.stdout)
    assert [(x["name"], x["current"]) for x in rows] == [("default", False), ("rig2", True)]
    with pytest.raises(SystemExit) as ended:  # the far end is the entry point's
        main(["system", "remote", encode_payload(["ps"], "rig2", version="0.0.1")])
    said = capsys.readouterr().err
    assert ended.value.code == 2  # a UserError, by main's one handler
    assert "rig2 runs llama-orch" in said and "==0.0.1" in said
    assert MARKER in said  # marked: stderr is no terminal here
