import threading

from llama_orchestrator.engine.logs import (
    LineTimes,
    follow,
    rotate_if_needed,
    server_lines,
    start_line,
    tail_lines,
    timed_lines,
    wall_clock,
)

T0 = 1_790_000_000.25  # 2026-09-21T14:13:20.250Z


def test_tail_lines_reads_the_end(tmp_path):
    p = tmp_path / "x.log"
    p.write_text("".join(f"line {i}\n" for i in range(10000)))
    assert tail_lines(p, 3) == ["line 9997", "line 9998", "line 9999"]
    assert tail_lines(p, 0) == []
    assert tail_lines(tmp_path / "missing.log", 5) == []


def test_rotation_keeps_n_backups_and_truncates_in_place(tmp_path):
    p = tmp_path / "stderr.log"
    with open(p, "ab") as writer:  # a child's O_APPEND handle stays valid across rotations
        for i in range(5):
            writer.write(f"gen{i}\n".encode() * 300)
            writer.flush()
            assert rotate_if_needed(p, max_bytes=1024, backups=2)
        writer.write(b"after\n")
        writer.flush()
    assert p.read_text() == "after\n"  # written at the start, not after a hole
    assert (tmp_path / "stderr.log.1").read_text().startswith("gen4")
    assert (tmp_path / "stderr.log.2").read_text().startswith("gen3")
    assert not (tmp_path / "stderr.log.3").exists()
    assert not rotate_if_needed(p, max_bytes=1024, backups=2)


def test_line_times_count_llama_cpp_prefixes_from_the_start_line():
    lines = [
        "from a version that wrote no start line",
        start_line(T0),
        "load_backend: loaded CPU backend",  # no prefix: the time of the line before
        "0.00.100.000 I main: loading model",
        "1.02.003.004 I srv  update_slots: all slots are idle",
        "ggml_print: no prefix either",
        start_line(T0 + 3600, rotated=True),  # a rotation (or a new run) starts anew
        "0.00.000.500 I srv  log_server_r: request: GET /health 200",
    ]
    got = timed_lines(lines, LineTimes())
    assert [t if t is None else round(t - T0, 6) for t, _ in got] == [
        None,
        0.0,
        0.0,
        0.1,
        62.003004,
        62.003004,
        3600.0,
        3600.0005,
    ]
    since = timed_lines(lines, LineTimes(), since=T0 + 1)
    assert [line for _, line in since] == lines[4:]  # unknown times are not "since"
    assert wall_clock(T0) == "2026-09-21T14:13:20.250Z" and wall_clock(None).strip() == ""


def test_a_bad_time_in_a_start_line_is_no_time():
    times = LineTimes()
    assert times.time_of("--- llama-orch: process started at yesterday ---") is None
    assert times.time_of("0.00.001.000 I x") is None


def test_server_lines_are_the_latest_runs_only(tmp_path):
    p = tmp_path / "stderr.log"
    p.write_text(f"{start_line(T0)}\nold 1\nold 2\n{start_line(T0 + 9)}\nnew 1\nnew 2\n")
    assert server_lines(p, 10) == ["new 1", "new 2"]
    assert server_lines(p, 1) == ["new 2"]
    assert server_lines(p, 0) == []
    p.write_text(f"{start_line(T0)}\n")
    assert server_lines(p, 5) == []  # started, nothing written yet


def test_rotation_starts_the_emptied_log_with_the_header(tmp_path):
    p = tmp_path / "stderr.log"
    p.write_text("x" * 2000 + "\n")
    header = start_line(T0, rotated=True)
    assert rotate_if_needed(p, max_bytes=1024, backups=0, header=header)
    assert p.read_text() == header + "\n"
    assert LineTimes().time_of(header) == T0


def _collect(paths, n):
    got, stop = [], threading.Event()
    lines = follow(paths, should_stop=stop.is_set, interval=0.01)

    def run():
        for item in lines:
            got.append(item)
            if len(got) >= n:
                stop.set()

    t = threading.Thread(target=run)
    t.start()
    return got, stop, t


def test_follow_survives_copytruncate_and_rename_rotation(tmp_path):
    p = tmp_path / "stderr.log"
    p.write_text("old line\n")
    got, stop, t = _collect({"stderr": p}, 3)
    try:
        with open(p, "ab") as w:
            w.write(b"one\n")
            w.flush()
            _wait(lambda: len(got) >= 1)
            w.write(b"x" * 2000 + b"\n")
            w.flush()
            _wait(lambda: len(got) >= 2)
            rotate_if_needed(p, max_bytes=10, backups=1)  # copytruncate
        p.rename(tmp_path / "stderr.log.9")  # logrotate-style rename + new file
        p.write_text("three\n")
        t.join(timeout=10)
    finally:
        stop.set()
    assert [line[:5] for _, line in got] == ["one", "xxxxx", "three"]


def _wait(cond, timeout=10.0):
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "follow did not deliver in time"
        time.sleep(0.01)


def test_follow_sees_a_truncate_and_refill_past_its_position_between_polls(tmp_path):
    from llama_orchestrator.engine.logs import _Follower

    p = tmp_path / "stdout.log"
    p.write_text("")
    fol = _Follower(p, from_end=True)
    with open(p, "ab") as w:
        w.write(b"ping\n")
        w.flush()
        assert fol.poll() == ["ping"]
        rotate_if_needed(p, max_bytes=1, backups=1)
        w.write(b"a longer line written after the rotation\n")  # past the old position (5)
        w.flush()
    assert fol.poll() == ["a longer line written after the rotation"]
    fol.close()
