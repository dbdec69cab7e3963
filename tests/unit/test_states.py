from llama_orchestrator.states import ALLOWED, is_allowed
from llama_orchestrator.states import InstanceState as S


def test_every_state_has_a_row_and_is_reachable():
    assert set(ALLOWED) == set(S)
    reachable = {S.CREATED}
    frontier = [S.CREATED]
    while frontier:
        for nxt in ALLOWED[frontier.pop()]:
            if nxt not in reachable:
                reachable.add(nxt)
                frontier.append(nxt)
    assert reachable == set(S)


def test_staying_is_allowed_and_illegal_moves_are_not():
    assert all(is_allowed(s, s) for s in S)
    assert not is_allowed(S.STOPPED, S.HEALTHY)  # must go through starting
    assert not is_allowed(S.CREATED, S.HEALTHY)
    assert not is_allowed(S.STOPPING, S.STARTING)


def test_every_state_can_reach_stopped():
    for start in S:
        seen, todo = {start}, [start]
        while todo:
            for nxt in ALLOWED[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        assert S.STOPPED in seen or start == S.STOPPED, start
