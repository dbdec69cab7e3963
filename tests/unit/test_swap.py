"""The on-demand decisions (pure): what to stop so that one instance can start,
and when an idle one stops."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from llama_orchestrator.daemon.swap import Member, idle_due, plan_start
from llama_orchestrator.engine.policy import idle_left

GB = 1024**3
CARD = {0: 6 * GB}  # one 6 GB card


def od(name: str, running=True, busy=False, last_used=0.0, need=3.5, device=0, group=None):
    return Member(
        name,
        on_demand=True,
        running=running,
        busy=busy,
        last_used=last_used,
        demand={device: int(need * GB)} if need else {},
        group=group,
    )


def always(name: str, need=3.5, device=0):
    return Member(name, on_demand=False, running=True, demand={device: int(need * GB)})


def test_fits_next_to_what_runs_nothing_stops():
    assert plan_start(od("b", running=False, need=2), [od("a")], CARD).stop == ()


def test_an_idle_instance_is_swapped_out_with_the_reason():
    plan = plan_start(od("b", running=False), [od("a")], CARD)
    assert plan.wait is None
    assert plan.stop == (("a", "swapped out for b: 3.5 GB needed on GPU 0, 2.5 GB free"),)


def test_a_busy_or_always_on_instance_is_never_stopped_the_start_waits():
    for holder in (od("a", busy=True), always("a")):
        plan = plan_start(od("b", running=False), [holder], CARD)
        assert plan.stop == ()
        assert plan.wait is not None and "b needs 3.5 GB on GPU 0" in plan.wait


def test_least_recently_used_goes_first_and_only_as_many_as_needed():
    others = [od("old", last_used=10, need=2), od("new", last_used=20, need=2)]
    plan = plan_start(od("b", running=False, need=3), others, CARD)
    assert [n for n, _ in plan.stop] == ["old"]  # 6 - 2 = 4 GB free then
    plan = plan_start(od("b", running=False, need=5), others, CARD)
    assert [n for n, _ in plan.stop] == ["old", "new"]


def test_only_instances_on_the_short_device_are_stopped():
    cards = {0: 6 * GB, 1: 6 * GB}
    others = [od("elsewhere", device=1, last_used=0), od("here", device=0, last_used=5)]
    plan = plan_start(od("b", running=False, device=0), others, cards)
    assert [n for n, _ in plan.stop] == ["here"]


def test_live_free_memory_counts_what_is_not_ours():
    # estimates say 2.5 GB free, the card says 1 GB (another program): a's
    # estimated 3.5 GB back gives 4.5 GB, enough for 3.5
    plan = plan_start(od("b", running=False), [od("a")], CARD, free={0: 1 * GB})
    assert plan.stop == (("a", "swapped out for b: 3.5 GB needed on GPU 0, 1.0 GB free"),)
    plan = plan_start(od("b", running=False, need=5.5), [od("a")], CARD, free={0: 1 * GB})
    assert plan.wait is not None  # 1 + 3.5 < 5.5 even with a gone


def test_a_device_no_card_reported_is_not_checked_and_cpu_instances_always_fit():
    assert plan_start(od("b", running=False, device=3), [od("a", device=3)], CARD).stop == ()
    assert plan_start(od("b", running=False, need=0), [od("a")], CARD).stop == ()


def test_groups_hold_max_running_whatever_the_memory():
    others = [od("a", group="big", need=0, last_used=1), od("c", group="big", need=0, last_used=2)]
    plan = plan_start(
        od("b", running=False, group="big", need=0), others, CARD, max_running={"big": 2}
    )
    assert plan.stop == (("a", "swapped out for b: group 'big' runs at most 2"),)
    # default max_running: 1
    plan = plan_start(od("b", running=False, group="big", need=0), others[:1], CARD)
    assert [n for n, _ in plan.stop] == ["a"]
    busy = [od("a", group="big", need=0, busy=True)]
    plan = plan_start(od("b", running=False, group="big", need=0), busy, CARD)
    assert plan.stop == () and plan.wait == "group 'big' runs at most 1 at once and a is busy"
    # another group, or none, is not limited by it
    assert plan_start(od("b", running=False, need=0), busy, CARD).stop == ()


def test_the_idle_clock():
    assert idle_left(100.0, 30.0, busy=False, now=110.0) == 20.0
    assert idle_left(100.0, 30.0, busy=False, now=140.0) == 0.0
    assert idle_left(100.0, 30.0, busy=True, now=1000.0) is None  # never during a request
    members = [
        od("due", last_used=0),
        od("busy", last_used=0, busy=True),
        od("fresh", last_used=95),
        od("stopped", last_used=0, running=False),
        always("pinned"),
    ]
    ttl = {"due": 30.0, "busy": 30.0, "fresh": 30.0, "stopped": 30.0}
    assert idle_due(members, ttl, now=100.0) == ["due"]


# --- properties over random boxes ------------------------------------------------

members = st.builds(
    Member,
    name=st.sampled_from("abcdefgh"),
    on_demand=st.booleans(),
    running=st.booleans(),
    busy=st.booleans(),
    last_used=st.floats(0, 100),
    demand=st.dictionaries(st.integers(0, 2), st.integers(0, 4).map(lambda g: g * GB), max_size=2),
    group=st.sampled_from([None, "big", "small"]),
)


@settings(max_examples=400, deadline=None)
@given(
    target=members,
    others=st.lists(members, max_size=7, unique_by=lambda m: m.name),
    total=st.dictionaries(st.integers(0, 2), st.integers(2, 8).map(lambda g: g * GB)),
    free=st.none() | st.dictionaries(st.integers(0, 2), st.integers(0, 8).map(lambda g: g * GB)),
    limits=st.dictionaries(st.sampled_from(["big", "small"]), st.integers(1, 3)),
)
def test_plans_are_safe_sufficient_and_wait_only_when_they_must(
    target, others, total, free, limits
):
    others = [m for m in others if m.name != target.name]
    plan = plan_start(target, others, total, free, limits)
    by_name = {m.name: m for m in others}
    stopped = {n for n, _ in plan.stop}
    for name in stopped:  # never a busy, always-on or stopped instance
        m = by_name[name]
        assert m.on_demand and m.running and not m.busy
    if plan.wait is not None:
        assert plan.stop == ()
        # waiting is right only if even stopping every idle on-demand one is not enough
        idle = {m.name for m in others if m.on_demand and m.running and not m.busy}
        assert not _fits(target, others, idle, total, free, limits)
    else:
        assert _fits(target, others, stopped, total, free, limits)
        for name in stopped:  # each one stopped was on a device or in a group in question
            m = by_name[name]
            assert (set(m.demand) & set(target.demand)) or (
                target.group is not None and m.group == target.group
            )


def _fits(target, others, gone, total, free, limits) -> bool:
    left = [m for m in others if m.running and m.name not in gone]
    if target.group is not None and sum(m.group == target.group for m in left) >= limits.get(
        target.group, 1
    ):
        return False
    for d, need in target.demand.items():
        if d not in total:
            continue
        avail = total[d] - sum(m.demand.get(d, 0) for m in left)
        if free is not None and d in free:
            back = sum(m.demand.get(d, 0) for m in others if m.running and m.name in gone)
            avail = min(avail, free[d] + back)
        if need > avail:
            return False
    return True
