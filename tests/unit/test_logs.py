import threading

from llama_orchestrator.engine.logs import follow, rotate_if_needed, tail_lines


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
