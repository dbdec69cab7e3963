"""plans.exitfile: a shell attempt's end, written for the next daemon."""

import subprocess
import sys

import pytest

from llama_orchestrator.plans import exitfile
from llama_orchestrator.plans.exitfile import Ended


def run(tmp_path, argv):
    exit_file = tmp_path / "t.1.exit"
    done = subprocess.run(exitfile.wrap(argv, exit_file), capture_output=True, text=True)
    return done, exitfile.read(exit_file)


def test_the_commands_code_and_output_pass_through_and_are_written(tmp_path):
    done, ended = run(tmp_path, [sys.executable, "-c", "print('hi'); raise SystemExit(3)"])
    assert (done.returncode, done.stdout) == (3, "hi\n")
    assert ended == Ended(3)


def test_a_command_that_cannot_start_says_why(tmp_path):
    done, ended = run(tmp_path, ["/no/such/program", "x"])
    assert done.returncode == 127 and ended is not None and ended.code == 127
    assert ended.error == "cannot run '/no/such/program': No such file or directory"
    assert ended.error in done.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_command_killed_by_a_signal_is_written_as_such(tmp_path):
    done, ended = run(tmp_path, [sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"])
    assert ended == Ended(-9) and done.returncode == 137


def test_no_file_or_a_torn_one_reads_as_not_ended(tmp_path):
    assert exitfile.read(tmp_path / "none.exit") is None
    (tmp_path / "torn.exit").write_text('{"code": ')
    assert exitfile.read(tmp_path / "torn.exit") is None
