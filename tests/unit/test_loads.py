"""The load queue (`loads.max_concurrent`), pure: who loads, who waits, in what order."""

from __future__ import annotations

from llama_orchestrator.daemon.loads import LoadQueue


def test_one_load_at_a_time_the_rest_wait_in_order_and_see_their_place():
    q = LoadQueue(1)
    assert q.enter("a") and not q.enter("b") and not q.enter("c")
    assert q.positions() == {"a": (1, 3), "b": (2, 3), "c": (3, 3)}
    assert q.leave("a") == ["b"]
    assert q.positions() == {"b": (1, 2), "c": (2, 2)}
    assert q.leave("c") == []  # a waiting one gives up its place: nobody new loads
    assert q.leave("b") == [] and q.positions() == {}
    assert q.position("a") is None


def test_asking_again_is_harmless_and_a_newcomer_never_jumps_the_line():
    q = LoadQueue(1)
    assert q.enter("a") and q.enter("a")  # loading already: still may load
    assert not q.enter("b") and not q.enter("b")
    assert q.waiting == [(False, "b")]
    assert q.leave("a") == ["b"]
    # room, but someone waits: the newcomer queues behind them (none here after grant)
    assert not q.enter("c") and q.leave("b") == ["c"]


def test_urgent_starts_go_first_in_the_order_they_came():
    q = LoadQueue(1)
    q.enter("x")
    for name in ("a", "b"):
        q.enter(name)
    q.enter("u1", urgent=True)
    q.enter("u2", urgent=True)
    assert [n for _, n in q.waiting] == ["u1", "u2", "a", "b"]
    q.enter("b", urgent=True)  # a waiting one asked again, urgently: moves up
    q.enter("u1")  # asking again without urgency never moves one back
    assert [n for _, n in q.waiting] == ["u1", "u2", "b", "a"]
    assert [q.leave(n) for n in ("x", "u1", "u2", "b")] == [["u1"], ["u2"], ["b"], ["a"]]


def test_no_limit_and_a_raised_limit_let_everyone_load():
    q = LoadQueue(0)
    assert all(q.enter(n) for n in "abcde") and q.positions()["e"] == (5, 5)
    q = LoadQueue(1)
    for n in "abc":
        q.enter(n)
    q.limit = 2
    assert q.grant() == ["b"] and q.loading == ["a", "b"]
    q.limit = 0
    assert q.grant() == ["c"]


def test_a_process_adopted_while_loading_holds_a_slot_even_beyond_the_limit():
    q = LoadQueue(1)
    q.enter("a")
    q.enter("w")
    q.take("b")  # the last daemon started it, and it still loads
    q.take("w")  # one that waited is loading after all
    assert q.loading == ["a", "b", "w"] and q.waiting == []
    q.enter("c")
    assert q.leave("a") == [] and q.leave("b") == [] and q.leave("w") == ["c"]
