"""Another machine's llama-orch, over the system's OpenSSH client
(`--host ssh://user@rig2[:port][/home]`, `$LLAMA_ORCH_HOST`, a context).

How: the command given runs where the home is, as
`ssh [-t|-T] [-p port] [user@]host -- <remote-command> system remote <payload>`:
the remote llama-orch checks that its version is ours, then runs the very
same argv against its home, and its stdout, stderr and exit code are ours.

Why not a bridge to the remote daemon's socket (`docker system dial-stdio`,
`ssh -L`): Docker's CLI is nothing but an API client, ours is not. `init`
writes configs, `logs -f` follows files, `gpus` asks the vendor tools where
the cards are, `up --wait` reads the state database, and every command also
works when no daemon runs; a socket bridge would need a control-API verb
for each of these, and would still differ from local output. Running the
same command where the home is gives identical output by construction, the
dashboard included (`ssh -t`). ssh is the transport either way: the user's
keys, agent, `~/.ssh/config` and known_hosts checking, and nothing of ours
handles a password or a key.

The payload is the argv as base64 of JSON: the remote shell (sh, bash,
cmd.exe, PowerShell) sees one plain word, so no argument is ever parsed by
a shell, whatever it holds. `LLAMA_ORCH_SSH_COMMAND` replaces `ssh` (as
GIT_SSH_COMMAND does for git): e.g. `ssh -F ./ssh_config`.

Pure parts (parsing, argv, payload, what ssh's stderr means) are tested
without ssh; `run` is the thin shell around them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shlex
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import IO
from urllib.parse import unquote, urlsplit

from llama_orchestrator import __version__
from llama_orchestrator.errors import OrchError, UserError

__all__ = [
    "SshTarget",
    "parse_target",
    "encode_payload",
    "decode_payload",
    "ssh_argv",
    "split_root_args",
    "ssh_failure",
    "MARKER",
    "run",
    "start",
    "call",
    "split_marked",
    "LOCAL_ONLY",
]

#: what the remote side writes on stderr once it runs (the lines before it
#: are ssh's own); the version follows it
MARKER = "\x1dllama-orch-remote "
#: exit code of the remote shell when the command is not found
NOT_FOUND = 127
#: ssh's exit code for its own failures
SSH_FAILED = 255
#: commands that are about this machine, never sent elsewhere
LOCAL_ONLY = {"context", "system"}
#: the longest line `start`'s reader takes (asyncio's default is 64 KiB)
LINE_LIMIT = 64 << 20
#: the root options that take a value (the rest are flags)
_VALUED = {"--home", "--host"}


@dataclass(frozen=True)
class SshTarget:
    """Where a command runs: `ssh://[user@]host[:port][/home]`."""

    host: str
    user: str | None = None
    port: int | None = None
    home: str | None = None  # the remote home (None: the remote default)
    #: the llama-orch to run there (a path, when it is not on ssh's PATH)
    command: str = "llama-orch"
    #: the name to show (a context's, else the host)
    label: str = ""

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    @property
    def url(self) -> str:
        port = f":{self.port}" if self.port else ""
        return f"ssh://{self.destination}{port}{self.home or ''}"

    @property
    def name(self) -> str:
        return self.label or self.host


def parse_target(url: str, command: str = "llama-orch", label: str = "") -> SshTarget:
    """`ssh://[user@]host[:port][/path/to/home]` as a target; a UserError
    that names the fix for anything else."""
    hint = "Write it as ssh://[user@]host[:port][/path/to/home], e.g. ssh://me@rig2."
    parts = urlsplit(url.strip())
    if parts.scheme != "ssh":
        raise UserError(f"The host '{url}' is not an ssh:// address.", hint=hint)
    try:
        port = parts.port
    except ValueError:
        raise UserError(
            f"The port in '{url}' is not a number from 1 to 65535.", hint=hint
        ) from None
    if not parts.hostname or parts.password is not None or parts.query or parts.fragment:
        raise UserError(f"The host '{url}' is not one llama-orch can reach by ssh.", hint=hint)
    if parts.hostname.startswith("-") or (parts.username or "").startswith("-"):
        raise UserError(f"The host '{url}' starts with '-', which ssh would take as an option.")
    home = unquote(parts.path) if parts.path not in ("", "/") else None
    return SshTarget(
        parts.hostname,
        unquote(parts.username) if parts.username else None,
        port,
        home,
        command or "llama-orch",
        label,
    )


def encode_payload(argv: list[str], label: str, version: str = __version__) -> str:
    """The argv (and who we are) as one shell-safe word."""
    raw = json.dumps({"v": 1, "version": version, "argv": argv, "machine": label})
    return base64.urlsafe_b64encode(raw.encode()).decode()


def decode_payload(word: str) -> tuple[str, list[str], str]:
    """(version, argv, machine) from `encode_payload`'s word; UserError if it is not one."""
    try:
        data = json.loads(base64.urlsafe_b64decode(word.encode()))
        version, argv, machine = data["version"], data["argv"], data.get("machine", "")
    except (ValueError, KeyError, TypeError):
        raise UserError(
            "`system remote` takes what `--host ssh://…` sends; it is not for people."
        ) from None
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise UserError("`system remote` was sent an argv that is not a list of strings.")
    return str(version), argv, str(machine or "")


def version_mismatch(theirs: str, here: str, machine: str) -> str | None:
    """The one sentence for a client of another version (None: the same)."""
    if theirs == here:
        return None
    return (
        f"{machine or 'This machine'} runs llama-orch {here} and was asked by llama-orch "
        f"{theirs}; install the same version on both (`pip install llama-orch=={theirs}` here, "
        f"or {here} there)."
    )


#: OpenSSH's keepalive: a probe every ALIVE_S seconds, given up after ALIVE_COUNT unanswered
ALIVE_S, ALIVE_COUNT = 5, 3


def ssh_argv(
    target: SshTarget, payload: str, tty: bool, ssh_command: str | None = None
) -> list[str]:
    """The ssh command line: the user's ssh (keys, agent, ~/.ssh/config,
    known_hosts checking left on), a terminal only when we have one, and
    no prompt when there is nobody to answer it. OpenSSH's own keepalive
    ends a connection to a machine that is gone (its link cut, powered off)
    within about 15 s (ALIVE_S times ALIVE_COUNT), where TCP would wait for
    many minutes: a plan's task there fails naming the host, not at its own
    timeout."""
    argv = shlex.split(ssh_command) if ssh_command else ["ssh"]
    argv += ["-t" if tty else "-T", "-o", "ConnectTimeout=10"]
    argv += ["-o", f"ServerAliveInterval={ALIVE_S}", "-o", f"ServerAliveCountMax={ALIVE_COUNT}"]
    if not tty:
        argv += ["-o", "BatchMode=yes"]
    if target.port:
        argv += ["-p", str(target.port)]
    return [*argv, "--", target.destination, target.command, "system", "remote", payload]


def split_root_args(args: list[str]) -> tuple[str | None, list[str], str | None]:
    """(--host's value, the argv without it, the command's name) from the
    command line as given: `--host` is a root option (before the command)."""
    host = None
    rest: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            break
        if not a.startswith("-"):
            return host, rest + args[i:], a
        if a == "--host" and i + 1 < len(args):
            host = args[i + 1]
            i += 2
            continue
        if a.startswith("--host="):
            host = a.split("=", 1)[1]
            i += 1
            continue
        rest.append(a)
        if a in _VALUED and i + 1 < len(args):
            rest.append(args[i + 1])
            i += 1
        i += 1
    return host, rest + args[i:], None


_SSH_SAYS = [
    # (pattern in ssh's stderr, exit code, what we say; {name} {dest} {host})
    (
        r"REMOTE HOST IDENTIFICATION HAS CHANGED|has changed and you have requested strict",
        2,
        "The SSH host key of {name} has changed since it was recorded in known_hosts, so "
        "ssh refused to connect (it may be an attack); if {host} was reinstalled, check the "
        "new key and remove the old one with `ssh-keygen -R {known_as}`.",
    ),
    (
        r"No \S+ host key is known|Host key verification failed",
        2,
        "The SSH host key of {name} is not known yet, so ssh refused to connect; check it "
        "and record it once with `ssh {dest}` (or add it to ~/.ssh/known_hosts).",
    ),
    (
        r"Permission denied",
        2,
        "{name} refused the SSH login for {dest}; add your public key to its "
        "~/.ssh/authorized_keys, or load the right key with `ssh-add`.",
    ),
    (
        r"Could not resolve hostname",
        2,
        "The host name {host} of {name} could not be resolved; check the name, or put it "
        "in ~/.ssh/config or /etc/hosts.",
    ),
    (
        r"Connection refused",
        1,
        "{name} refused the connection: no SSH server listens at {host}{port}; start sshd "
        "there, or give the right port (ssh://{dest}:PORT).",
    ),
    (
        r"timed out|No route to host|Network is unreachable|closed by remote host|Connection closed|Connection reset",
        1,
        "{name} cannot be reached over SSH ({detail}); check that it is up and on the network.",
    ),
]


def ssh_failure(target: SshTarget, rc: int, before: str, started: bool) -> OrchError | None:
    """What ssh's failure means, in one sentence (None: it did not fail):
    `before` is what was said on stderr before the remote llama-orch ran
    (`started`: it did, and `rc` is its own unless ssh lost the link)."""
    if started:
        if rc != SSH_FAILED:
            return None
        return OrchError(
            f"The SSH connection to {target.name} was lost while the command ran there; "
            "check that it is up and on the network (what it was doing may have finished)."
        )
    if rc == NOT_FOUND or (rc and re.search(r"not found|not recognized|No such file", before)):
        return UserError(
            f"{target.name} has no `{target.command}` that ssh can run; install llama-orch "
            f"{__version__} there (`pip install llama-orch=={__version__}`), or give its path "
            "with `llama-orch context create NAME --host … --remote-command PATH`."
        )
    if rc != SSH_FAILED:
        return None
    lines = [ln.strip() for ln in before.splitlines() if ln.strip()]
    detail = next((ln.removeprefix("ssh: ") for ln in reversed(lines)), "ssh failed")
    fields = {
        "name": target.name,
        "dest": target.destination,
        "host": target.host,
        "port": f":{target.port}" if target.port else "",
        "known_as": f"'[{target.host}]:{target.port}'" if target.port else target.host,
        "detail": detail.rstrip("."),
    }
    for pattern, code, text in _SSH_SAYS:
        if re.search(pattern, before):
            error = OrchError(text.format(**fields))
            error.exit_code = code
            return error
    return OrchError(f"ssh to {target.name} failed: {fields['detail']}.")


class _Relay(threading.Thread):
    """ssh's own stderr lines are kept (to say what they mean); the remote
    llama-orch's, from its marker on, pass through as they come."""

    def __init__(self, stream: IO[bytes], out: IO[str]) -> None:
        super().__init__(daemon=True)
        self.stream, self.out = stream, out
        self.before: list[str] = []
        self.started = False

    def run(self) -> None:
        for raw in iter(self.stream.readline, b""):
            line = raw.decode("utf-8", "replace")
            if self.started:
                self.out.write(line)
                self.out.flush()
            elif line.startswith(MARKER):
                self.started = True
            else:
                self.before.append(line)


def _command(target: SshTarget, argv: list[str], tty: bool) -> list[str]:
    """The ssh command line that runs `llama-orch <argv>` against the target's home."""
    if target.home is not None:
        argv = ["--home", target.home, *argv]
    payload = encode_payload(argv, target.name)
    return ssh_argv(target, payload, tty, os.environ.get("LLAMA_ORCH_SSH_COMMAND"))


def split_marked(stderr: str) -> tuple[str, str, bool]:
    """(ssh's lines, the remote llama-orch's, whether it ran) of a whole stderr."""
    head, marker, tail = stderr.partition(MARKER)
    if not marker:
        return stderr, "", False
    return head, tail.partition("\n")[2], True


async def start(target: SshTarget, argv: list[str]) -> asyncio.subprocess.Process:
    """`llama-orch <argv>` on `target` as a child of ours, for the daemon
    (no terminal, no prompt): stdin, stdout and stderr are pipes."""
    cmd = _command(target, argv, tty=False)
    try:
        return await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            # its own group, as a shell task's: the daemon after a crash stops
            # it (and nothing else) by the pid recorded; ignored on Windows
            start_new_session=True,
            # a line may be long: `system task` sends a task's whole output as one
            limit=LINE_LIMIT,
        )
    except FileNotFoundError:
        raise OrchError(f"There is no `{cmd[0]}` here to reach {target.name}.") from None


async def call(target: SshTarget, argv: list[str], stdin: bytes = b"") -> tuple[int, str, str]:
    """`llama-orch <argv>` on `target`, read whole: (exit code, stdout, its
    stderr). Raises OrchError when ssh (or the far side) could not run it."""
    proc = await start(target, argv)
    out, err = await proc.communicate(stdin)
    rc = proc.returncode or 0
    before, said, started = split_marked(err.decode("utf-8", "replace"))
    if (problem := ssh_failure(target, rc, before, started)) is not None:
        raise problem
    return rc, out.decode("utf-8", "replace"), said


def run(target: SshTarget, argv: list[str]) -> int:
    """Run `llama-orch <argv>` on `target`; its exit code. Raises OrchError
    with one sentence when ssh (or the remote side) could not."""
    cmd = _command(target, argv, tty=sys.stdin.isatty() and sys.stdout.isatty())
    try:
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise UserError(
            f"There is no `{cmd[0]}` here to reach {target.name}; install the OpenSSH client "
            "(Debian: openssh-client; Windows: the OpenSSH Client optional feature)."
        ) from None
    assert proc.stderr is not None
    relay = _Relay(proc.stderr, sys.stderr)
    relay.start()
    try:
        rc = proc.wait()
    except KeyboardInterrupt:  # without -t (with it, ^C goes to the far side as a key)
        proc.terminate()  # the far side sees its output's reader go, and stops too
        proc.wait()
        relay.join(timeout=5)
        raise
    relay.join(timeout=5)
    before = "".join(relay.before)
    problem = ssh_failure(target, rc, before, relay.started)
    if problem is not None:
        raise problem
    if rc and not relay.started:
        sys.stderr.write(before)  # the remote side failed before it ran: its own words
    return rc
