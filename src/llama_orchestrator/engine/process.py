"""Process identity and stopping a process tree (DESIGN §3).

A process is an instance's only if both its PID and its psutil create_time
match what was recorded: PIDs are reused, the pair is not.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from dataclasses import dataclass

import psutil

from llama_orchestrator import platform
from llama_orchestrator.errors import OrchError

__all__ = [
    "ProcRef",
    "find",
    "is_alive",
    "stop_tree",
    "create_time_of",
    "track_child",
    "exit_code",
    "wait_exit",
]

_CT_TOLERANCE = 0.05  # create_time is rounded differently across psutil calls


@dataclass(frozen=True)
class ProcRef:
    pid: int
    create_time: float

    @classmethod
    def of(cls, pid: int | None, create_time: float | None) -> ProcRef | None:
        """The process a row records, or None when it records none."""
        return cls(pid, create_time) if pid and create_time else None


# Children this process spawned, and exit codes collected from dead ones.
# Only a parent can read a child's exit code, once: whoever reaps it first
# (an identity check finding a zombie, a stop, a Popen) stores it here.
_children: dict[int, subprocess.Popen[bytes]] = {}
_exit_codes: dict[int, int] = {}


def track_child(proc: subprocess.Popen[bytes]) -> None:
    _children[proc.pid] = proc


def _reap(pid: int) -> None:
    """Collect the exit status of our own dead child so it stops being a zombie."""
    proc = _children.get(pid)
    if proc is not None:
        code = proc.poll()
        if code is not None:
            _exit_codes[pid] = code
            _children.pop(pid, None)
        return
    if os.name == "posix":
        with contextlib.suppress(ChildProcessError, OSError):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                _exit_codes[pid] = os.waitstatus_to_exitcode(status)


def exit_code(pid: int, wait: float = 2.0) -> int | None:
    """The exit code of a dead child of ours (negative: killed by that signal);
    None when it was not our child.

    Waits up to `wait` seconds: a multi-threaded process shows as a zombie as
    soon as its main thread exits, but can be reaped only once every thread
    has, which takes a moment after a SIGKILL."""
    proc = _children.get(pid)
    if proc is not None and pid not in _exit_codes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            _exit_codes[pid] = proc.wait(timeout=wait)
            _children.pop(pid, None)
    _reap(pid)
    return _exit_codes.pop(pid, None)


def wait_exit(ref: ProcRef) -> None:
    """Block until the process `ref` names has ended (the thread-based watch
    where the OS has no pidfd). A child of ours is waited for through its
    Popen, which keeps its exit code for `exit_code`."""
    proc = _children.get(ref.pid)
    if proc is not None:
        with contextlib.suppress(Exception):
            proc.wait()
        return
    p = find(ref)
    if p is not None:
        with contextlib.suppress(psutil.Error):
            p.wait()


def find(ref: ProcRef | None) -> psutil.Process | None:
    """The live process `ref` names, or None if it is gone (or a zombie)."""
    if ref is None:
        return None
    try:
        p = psutil.Process(ref.pid)
        if abs(p.create_time() - ref.create_time) > _CT_TOLERANCE:
            return None  # the PID now belongs to another process
        if p.status() == psutil.STATUS_ZOMBIE:
            _reap(ref.pid)
            return None
        return p
    except psutil.Error:
        return None


def is_alive(ref: ProcRef | None) -> bool:
    return find(ref) is not None


def activity(ref: ProcRef | None) -> int:
    """What grows while a process loads a model: its resident memory (an
    mmap'd model's pages as they are touched) plus the bytes it read from
    storage (where the platform counts them; not socket reads: our probes
    must not look like progress); 0 once it is gone."""
    p = find(ref)
    if p is None:
        return 0
    try:
        rss = p.memory_info().rss
        io = p.io_counters() if hasattr(p, "io_counters") else None  # not on macOS
    except psutil.Error:
        return 0
    return int(rss) + (int(getattr(io, "read_bytes", 0)) if io is not None else 0)


def create_time_of(pid: int) -> float:
    return psutil.Process(pid).create_time()


def _tree(p: psutil.Process) -> list[psutil.Process]:
    try:
        return [p, *p.children(recursive=True)]
    except psutil.Error:
        return [p]


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process is gone (reaping our children); return the living."""
    deadline = time.monotonic() + timeout
    alive = procs
    while alive:
        step = max(0.0, min(0.1, deadline - time.monotonic()))
        # our own children are reaped by their Popen only (through _still_running):
        # psutil reaping one first left its Popen to say it exited with code 0
        others = [p for p in alive if p.pid not in _children]
        if others:
            psutil.wait_procs(others, timeout=step)
        else:
            time.sleep(min(step, 0.02))
        alive = [p for p in alive if _still_running(p)]
        if time.monotonic() >= deadline:
            break
    return alive


def _still_running(p: psutil.Process) -> bool:
    try:
        if p.status() == psutil.STATUS_ZOMBIE:
            _reap(p.pid)
            return False
        return p.is_running()
    except psutil.Error:
        return False


def stop_tree(ref: ProcRef, timeout: float) -> bool:
    """Ask the process and its children to stop, kill what is left after
    `timeout` seconds, and return only when none of the tree lives.

    Returns True when the graceful stop was enough. Raises OrchError if even
    the kill leaves a process behind (e.g. one in uninterruptible sleep)."""
    root = find(ref)
    if root is None:
        return True
    tree = _tree(root)  # collected first: children re-parent once the root exits
    platform.request_stop(ref.pid)
    alive = _wait_gone(tree, timeout)
    if not alive:
        return True
    platform.force_kill_group(ref.pid)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    alive = _wait_gone(alive, 10)
    if alive:
        pids = ", ".join(str(p.pid) for p in alive)
        raise OrchError(f"Processes {pids} survived SIGKILL; they may be stuck in the kernel.")
    return False


def same_process(a: ProcRef, b: ProcRef) -> bool:
    """Whether two references name one process (create times are rounded)."""
    return a.pid == b.pid and abs(a.create_time - b.create_time) <= _CT_TOLERANCE


def marked_processes(home_root: str) -> list[tuple[str, psutil.Process]]:
    """Live processes whose environment marks them as an instance of the home
    at `home_root` (config.command's LLAMA_ORCH_HOME and _INSTANCE), with the
    instance each says it is. Only processes we may read the environment of
    (our user's) are seen: those are the ones we could have started."""
    from llama_orchestrator.config.command import HOME_ENV, INSTANCE_ENV

    found = []
    for p in psutil.process_iter():
        try:
            env = p.environ()
            name = env.get(INSTANCE_ENV)
            if name and env.get(HOME_ENV) == home_root and p.status() != psutil.STATUS_ZOMBIE:
                found.append((name, p))
        except psutil.Error:
            continue
    return found


def port_owner(port: int) -> tuple[str, str] | None:
    """(home, instance) of the llama-orch instance listening on `port`, as its
    environment says (config.command's marks); None when the listener is
    another program, or one we may not look at."""
    from llama_orchestrator.config.command import HOME_ENV, INSTANCE_ENV

    try:
        listening = [
            c.pid
            for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid
        ]
    except (psutil.Error, OSError):
        return None
    for pid in listening:
        try:
            env = psutil.Process(pid).environ()
        except psutil.Error:
            continue
        if env.get(INSTANCE_ENV) and env.get(HOME_ENV):
            return env[HOME_ENV], env[INSTANCE_ENV]
    return None
