"""The plan scheduler, pure, with the clock passed in: order, priorities, slot
limits, retries with backoff, cascade, timeouts, cancel/retry/resume; and a
Hypothesis simulation of whole runs on random DAGs with random failures."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from llama_orchestrator.plans import schedule as S
from llama_orchestrator.plans.spec import Plan, Task


def make(*tasks: Task) -> tuple[Plan, dict[str, S.TaskRecord]]:
    p = Plan("p", tasks, {}, ".")
    return p, {t.id: S.TaskRecord(t.id) for t in tasks}


def llm(id_: str, *deps: str, model: str = "m", **kw) -> Task:
    return Task(id_, "llm", depends_on=deps, model=model, prompt="x", **kw)


def sh(id_: str, *deps: str, **kw) -> Task:
    return Task(id_, "shell", depends_on=deps, command=("true",), **kw)


def states(records) -> dict[str, str]:
    return {k: r.state for k, r in records.items()}


def test_only_tasks_whose_dependencies_completed_become_ready():
    p, r = make(llm("a"), llm("b", "a"), llm("c", "a", "b"))
    assert S.promote(p, r) == ["a"]
    S.start(r, "a", 0)
    assert S.promote(p, r) == []
    S.finish(p, r, "a", 1)
    assert S.promote(p, r) == ["b"] and r["c"].state == S.PENDING


def test_priority_first_then_plan_order_within_free_slots():
    p, r = make(llm("low", priority=1), llm("mid1"), llm("high", priority=10), llm("mid2"), sh("s"))
    S.promote(p, r)
    assert S.pick(p, r, 0, {"m": 2, "shell": 1}) == ["high", "mid1", "s"]
    assert S.pick(p, r, 0, {"m": 10}) == ["high", "mid1", "mid2", "low"]
    assert S.pick(p, r, 0, {}) == []


def test_a_full_model_does_not_hold_back_another_models_task():
    p, r = make(llm("a", priority=9, model="busy"), llm("b", priority=1, model="free"))
    S.promote(p, r)
    assert S.pick(p, r, 0, {"busy": 0, "free": 1}) == ["b"]


def test_retries_back_off_exponentially_then_fail_and_cascade():
    p, r = make(llm("a", retries=2, backoff=0.5), llm("b", "a"), llm("c", "b"), llm("x"))
    S.promote(p, r)
    waits = []
    now = 0.0
    for attempt in (1, 2, 3):
        assert S.pick(p, r, now, {"m": 1}) == ["a"]
        S.start(r, "a", now)
        assert r["a"].attempts == attempt
        skipped = S.finish(p, r, "a", now + 1, "boom " * 100)
        if r["a"].state == S.READY:
            waits.append(r["a"].not_before - (now + 1))
            assert S.pick(p, r, r["a"].not_before - 0.01, {"m": 1}) == ["x"]
            now = r["a"].not_before
    assert waits == [0.5, 1.0]
    assert r["a"].state == S.FAILED and len(r["a"].error) == S.ERROR_CHARS
    assert skipped == ["b", "c"]
    assert (r["b"].state, r["b"].error) == (S.SKIPPED, "skipped: a failed")
    assert r["x"].state == S.READY  # unrelated work goes on
    assert S.run_state(r) == "running"
    S.start(r, "x", now)
    S.finish(p, r, "x", now)
    assert S.run_state(r) == "failed"


def test_a_final_error_fails_at_once_whatever_the_retries():
    p, r = make(llm("a", retries=5), llm("b", "a"))
    S.promote(p, r)
    S.start(r, "a", 0)
    assert S.finish(p, r, "a", 1, "HTTP 400: too long", final=True) == ["b"]
    assert (r["a"].state, r["a"].attempts) == (S.FAILED, 1)


def test_an_attempt_that_never_reached_an_instance_is_not_counted():
    p, r = make(llm("a", retries=0))
    S.promote(p, r)
    S.start(r, "a", 0)
    S.postpone(r, "a", 1.0)
    assert (r["a"].state, r["a"].attempts, r["a"].not_before) == (S.READY, 0, 1.0)
    assert S.pick(p, r, 0.5, {"m": 1}) == [] and S.pick(p, r, 1.0, {"m": 1}) == ["a"]


def test_backoff_is_capped():
    assert S.backoff(1, 1) == 1 and S.backoff(1, 4) == 8 and S.backoff(1, 30) == S.BACKOFF_MAX


def test_timeouts_are_found_on_the_clock():
    p, r = make(llm("a", timeout=5), sh("b", timeout=1))
    S.promote(p, r)
    S.start(r, "a", 100)
    S.start(r, "b", 100)
    assert S.overdue(p, r, 100.5) == []
    assert S.overdue(p, r, 101) == ["b"]
    assert S.overdue(p, r, 105) == ["a", "b"]


def test_cancel_then_retry_keeps_completed_work():
    p, r = make(llm("a"), llm("b", "a"), llm("c", "b"), llm("d"))
    S.promote(p, r)
    S.start(r, "a", 0)
    S.finish(p, r, "a", 1)
    S.promote(p, r)
    S.start(r, "b", 1)
    assert S.cancel(r, 2) == ["b"]
    assert states(r) == {"a": "completed", "b": "cancelled", "c": "cancelled", "d": "cancelled"}
    assert S.run_state(r) == "cancelled"
    assert sorted(S.retry(r)) == ["b", "c", "d"]
    assert r["a"].state == S.COMPLETED and r["b"].attempts == 0
    assert S.promote(p, r) == ["b", "d"]


def test_resume_requeues_what_was_running_with_its_attempt_counted():
    p, r = make(llm("a"), llm("b"))
    S.promote(p, r)
    S.start(r, "a", 0)
    S.start(r, "b", 0)
    S.finish(p, r, "b", 1)
    assert S.resume(r) == ["a"]
    assert (r["a"].state, r["a"].attempts) == (S.READY, 1)
    assert r["b"].state == S.COMPLETED


def test_next_wakeup_is_the_soonest_backoff():
    p, r = make(llm("a", backoff=2), llm("b", backoff=1))
    S.promote(p, r)
    for t in ("a", "b"):
        S.start(r, t, 0)
        S.finish(p, r, t, 0, "x")
    assert S.next_wakeup(r, 0) == 1
    assert S.next_wakeup(r, 5) is None


# --- whole runs on random DAGs ---------------------------------------------------


@st.composite
def dags(draw):
    n = draw(st.integers(1, 8))
    tasks = []
    for i in range(n):
        deps = draw(st.sets(st.integers(0, i - 1), max_size=3)) if i else set()
        tasks.append(
            llm(
                f"t{i}",
                *(f"t{d}" for d in sorted(deps)),
                priority=draw(st.integers(1, 10)),
                retries=draw(st.integers(0, 2)),
                model=draw(st.sampled_from(["m", "n"])),
            )
        )
    # per task, per attempt: fails?
    fails = {t.id: draw(st.lists(st.booleans(), min_size=3, max_size=3)) for t in tasks}
    slots = {"m": draw(st.integers(1, 3)), "n": draw(st.integers(1, 3))}
    return tasks, fails, slots


@settings(max_examples=300, deadline=None)
@given(dags())
def test_random_runs_respect_dependencies_slots_retries_and_cascade(case):
    tasks, fails, slots = case
    p, r = make(*tasks)
    now = 0.0
    running: set[str] = set()
    for _ in range(200):
        S.promote(p, r)
        free = {
            k: v - sum(1 for t in running if p.task(t).slot_key() == k) for k, v in slots.items()
        }
        picked = S.pick(p, r, now, free)
        for t in picked:
            task = p.task(t)
            assert all(r[d].state == S.COMPLETED for d in task.depends_on)
            S.start(r, t, now)
            running.add(t)
        for k, limit in slots.items():
            assert sum(1 for t in running if p.task(t).slot_key() == k) <= limit
        if running:
            t = min(running)  # finish one per step
            running.discard(t)
            failed = fails[t][r[t].attempts - 1]
            S.finish(p, r, t, now, "boom" if failed else None)
        if S.run_state(r) != "running":
            break
        if not running:
            now = S.next_wakeup(r, now) or now + 0.1
    else:
        raise AssertionError(f"the run never ended: {states(r)}")
    for t in p.tasks:
        rec = r[t.id]
        assert rec.attempts <= t.retries + 1
        if rec.state == S.COMPLETED:
            assert not fails[t.id][rec.attempts - 1]
        elif rec.state == S.FAILED:
            assert rec.attempts == t.retries + 1 and all(fails[t.id][: rec.attempts])
        else:
            assert rec.state == S.SKIPPED
            assert any(r[a].state == S.FAILED for a in _ancestors(p, t.id))
    expected = "completed" if all(x.state == S.COMPLETED for x in r.values()) else "failed"
    assert S.run_state(r) == expected


def _ancestors(p: Plan, task_id: str) -> set[str]:
    out: set[str] = set()
    frontier = set(p.task(task_id).depends_on)
    while frontier:
        out |= frontier
        frontier = {d for f in frontier for d in p.task(f).depends_on} - out
    return out


def test_what_a_run_can_be_asked_follows_what_retry_starts_over():
    from llama_orchestrator.plans import RETRYABLE, run_verbs

    assert set(RETRYABLE) == {S.FAILED, S.SKIPPED, S.CANCELLED}
    assert run_verbs("running", {"running": 1, "failed": 1}) == {"cancel"}
    assert run_verbs("failed", {"completed": 1, "failed": 1}) == {"retry"}
    assert run_verbs("cancelled", {"cancelled": 2}) == {"retry"}
    assert run_verbs("completed", {"completed": 3}) == frozenset()
