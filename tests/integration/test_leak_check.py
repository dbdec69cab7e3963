"""The session-end leak check claims only what this test session started: a
user's own server started meanwhile is never counted, nor killed."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil

from tests.conftest import _MARK, _ours
from tests.helpers import FAKE_SERVER, free_port, wait_until


def _server(env: dict[str, str]) -> subprocess.Popen[bytes]:
    argv = [sys.executable, str(FAKE_SERVER), "--port", str(free_port())]
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_server_started_outside_the_session_is_not_ours():
    foreign = _server({k: v for k, v in os.environ.items() if k != _MARK})  # a user's
    mine = _server(dict(os.environ))  # what the tests start: the mark is inherited
    try:
        procs = [psutil.Process(p.pid) for p in (foreign, mine)]
        wait_until(lambda: all("fake_server.py" in " ".join(p.cmdline()) for p in procs))
        assert [_ours(p) for p in procs] == [False, True]
    finally:
        for p in (foreign, mine):
            p.kill()
            p.wait()
