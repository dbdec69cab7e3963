"""The daemon's instance runners and supervisor on a fake world (fake
processes, scripted probes, a clock that moves only when the test says):
every decision of the daemon, without a process or a socket."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from llama_orchestrator.daemon.commands import Adopt, Remove, Resume, Start, Stop
from llama_orchestrator.daemon.loads import LoadGate
from llama_orchestrator.daemon.supervisor import Supervisor
from llama_orchestrator.engine.health import DOWN, ERROR, HEALTHY, LOADING, LOCAL
from llama_orchestrator.errors import StartFailed, UserError
from llama_orchestrator.files import disk_full
from llama_orchestrator.states import Desired
from llama_orchestrator.states import InstanceState as S
from llama_orchestrator.store.database import Store
from llama_orchestrator.store.rows import InstanceRow
from tests.helpers import fill, make_room


async def test_a_start_loads_then_is_healthy_and_takes_requests(w):
    w.fx.add("a")
    w.fx.health["a"] = [LOADING, LOADING, HEALTHY]
    result = await w.up("a")
    assert result.outcome == "started" and w.row("a").state == S.STARTING
    assert "a" not in w.board.replicas  # loading: no requests yet
    await w.fx.advance(0.5)
    assert w.row("a").state == S.HEALTHY and w.sup.healthy("a")
    assert w.board.replicas["a"].port == w.fx.configs["a"].server.port
    assert w.kinds("a") == ["starting", "healthy"]
    first = [t for t, _, _ in w.fx.probes][:3]
    assert first[0] - w.fx.procs[0].ref.create_time == pytest.approx(0.05, abs=0.051)


async def test_a_kill_is_seen_at_once_and_restarted_after_the_backoff(w):
    w.fx.add("a")
    w.fx.health["a"] = HEALTHY
    await w.up("a")
    await w.fx.advance(0.3)
    w.fx.proc("a").end(signal=9)
    await w.fx.settle()
    r = w.row("a")
    assert r.state == S.BACKOFF and r.last_exit["signal"] == 9 and r.restarts == 1
    assert "a" not in w.board.replicas
    delay = r.next_restart_at - w.fx.t
    assert 0.9 <= delay <= 1.1  # backoff_initial 1 s, +-10 % jitter
    await w.fx.advance(delay - 0.1)
    assert len(w.fx.procs) == 1  # not before its time
    await w.fx.advance(0.6)
    assert len(w.fx.procs) == 2 and w.row("a").state == S.HEALTHY
    assert w.row("a").pid == w.fx.procs[1].ref.pid


async def test_a_crash_loop_ends_failed_after_max_retries_and_stays_down(w):
    w.fx.add("a", restart_policy={"max_retries": 2, "backoff_initial": 0.5})
    await w.up("a")
    for _ in range(3):
        w.fx.proc("a").end(code=1)
        await w.fx.advance(2)
    r = w.row("a")
    assert r.state == S.FAILED and len(w.fx.procs) == 3 and not w.sup.active("a")
    await w.fx.advance(30)
    assert len(w.fx.procs) == 3  # nothing pending
    assert w.kinds("a").count("backoff") == 2


async def test_failing_checks_make_it_unhealthy_then_it_is_stopped_and_restarted(w):
    w.fx.add("a", restart_policy={"backoff_initial": 0.5})
    w.fx.health["a"] = HEALTHY
    await w.up("a")
    await w.fx.advance(0.5)
    assert w.sup.healthy("a")
    w.fx.health["a"] = ERROR
    await w.fx.advance(1.05)  # one failure (of retries 2): still healthy
    assert w.row("a").state == S.HEALTHY and "a" in w.board.replicas
    w.fx.health["a"] = [ERROR, HEALTHY]  # the failure that counts; the next run is fine
    await w.fx.advance(1.0)
    assert w.fx.stops == [("a", 5)]  # stopped for failing its checks
    kinds = w.kinds("a")
    after = kinds[kinds.index("unhealthy") + 1 :]
    assert after[:2] == ["exited", "backoff"]  # its exit, then the restart policy
    assert w.row("a").restarts == 1
    await w.fx.advance(1.0)
    assert len(w.fx.procs) == 2 and w.row("a").state == S.HEALTHY and "a" in w.board.replicas


async def test_a_model_loading_within_start_period_is_no_failure(w):
    w.fx.add("a", healthcheck={"start_period": 5, "load_timeout": 2})
    w.fx.health["a"] = LOADING
    await w.up("a")
    await w.fx.advance(4.5)
    assert w.row("a").state == S.STARTING and not w.fx.stops
    await w.fx.advance(3)  # start_period over, and no progress for 2 s: two failures
    assert "unhealthy" in w.kinds("a") and w.fx.stops


async def test_a_load_that_progresses_outlasts_start_period_and_one_that_stalls_does_not(w):
    w.fx.add("a", healthcheck={"start_period": 2, "load_timeout": 3})
    w.fx.health["a"] = LOADING
    await w.up("a")
    for _ in range(20):  # 10 s, far past start_period: its log grows all along
        w.fx.logged["a"] = w.fx.logged.get("a", 0) + 100
        await w.fx.advance(0.5)
    assert w.row("a").state == S.STARTING and not w.fx.stops and "unhealthy" not in w.kinds("a")
    await w.fx.advance(2.5)  # silent, but not for load_timeout yet
    assert not w.fx.stops
    await w.fx.advance(3)  # silent for load_timeout: now its failures count
    assert "unhealthy" in w.kinds("a") and w.fx.stops == [("a", 5)]
    w.fx.health["a"] = HEALTHY  # restarted (on-failure), it loads quickly
    await w.fx.advance(2)
    assert w.row("a").state == S.HEALTHY and w.row("a").restarts == 1


# --- the load queue (loads.max_concurrent) ------------------------------------------


def _loading(w, names):
    return [n for n in names if w.row(n).state == S.STARTING]


async def _loading_one_at_a_time(w, names):
    """`up` of each (all slow to load) with one load at a time: the first loads."""
    w.deps.loads.set_limit(1)
    for n in names:
        w.fx.add(n)
        w.fx.health[n] = LOADING
        await w.up(n)


async def test_five_starts_load_one_at_a_time_in_order_and_none_is_restarted(w):
    w.deps.loads.set_limit(1)
    names = ["a", "b", "c", "d", "e"]
    for n in names:
        w.fx.add(n)
        w.fx.health[n] = LOADING
    results = [await w.up(n) for n in names]
    assert [r.outcome for r in results] == ["started"] + ["queued"] * 4
    assert [r.load_position for r in results[1:]] == [[2, 2], [3, 3], [4, 4], [5, 5]]
    assert [w.row(n).state for n in names] == [S.STARTING] + [S.QUEUED] * 4
    assert w.sup.loads() == {n: [k, 5] for k, n in enumerate(names, 1)}
    assert "load 3 of 3" in w.store.events("c")[-1].message
    order = []
    for n in names:  # each loads for 2 s; the next starts only once it is healthy
        await w.fx.advance(2)
        assert _loading(w, names) == [n] and len(w.fx.procs) == len(order) + 1
        w.fx.health[n] = HEALTHY
        await w.fx.advance(0.6)
        order.append(n)
    assert all(w.sup.healthy(n) for n in names)
    assert [p.name for p in w.fx.procs] == names and w.sup.loads() == {}
    assert all(w.row(n).restarts == 0 for n in names)
    assert w.kinds("b")[:3] == ["queued", "starting", "healthy"]


async def test_a_stopped_or_removed_queued_start_never_loads_and_frees_its_place(w):
    await _loading_one_at_a_time(w, "abc")
    assert await w.sup.down(["b"]) == []  # no process of it was running
    assert w.row("b").state == S.STOPPED and w.row("b").desired == Desired.STOPPED
    assert w.sup.loads() == {"a": [1, 2], "c": [2, 2]}
    w.fx.health["a"] = HEALTHY
    await w.fx.advance(1)
    assert w.row("c").state == S.STARTING and w.row("b").state == S.STOPPED
    assert [p.name for p in w.fx.procs] == ["a", "c"]


async def test_a_crash_while_loading_lets_the_next_load_and_its_restart_queues_behind(w):
    await _loading_one_at_a_time(w, "ab")
    w.fx.proc("a").end(code=1)  # dies loading: b's turn at once
    await w.fx.settle()
    assert w.row("a").state == S.BACKOFF and w.row("b").state == S.STARTING
    await w.fx.advance(1.2)  # a's restart is due while b still loads: it waits its turn
    assert w.row("a").state == S.QUEUED and len(w.fx.procs) == 2
    assert w.sup.active("a")  # a restart waiting to load is still in the daemon's care
    w.fx.health["b"] = HEALTHY
    await w.fx.advance(0.6)
    assert w.row("a").state == S.STARTING and w.row("a").restarts == 1


async def test_an_on_demand_start_goes_before_the_queued_ones_and_a_user_up_waits(w):
    w.deps.loads.set_limit(1)
    for n in ("a", "b", "lazy"):
        w.fx.add(n)
        w.fx.health[n] = LOADING
    await w.up("a")
    await w.up("b")
    result = await w.up("lazy", eager=True)  # requests wait on it
    assert result.outcome == "queued" and result.load_position == [2, 3]
    again = await w.up("b")  # asking again keeps b's place and says it
    assert again.outcome == "queued" and again.load_position == [3, 3]
    w.fx.health["a"] = HEALTHY
    await w.fx.advance(0.6)
    assert w.row("lazy").state == S.STARTING and w.row("b").state == S.QUEUED


async def test_a_start_that_fails_when_its_turn_comes_is_recorded_and_frees_the_slot(w):
    await _loading_one_at_a_time(w, "abc")
    w.fx.spawn_fails["b"] = StartFailed("port 9001 is taken")
    w.fx.health["a"] = HEALTHY
    await w.fx.advance(0.6)
    assert "start_failed" in w.kinds("b") and w.row("b").state == S.BACKOFF
    assert w.row("c").state == S.STARTING  # b's failure did not hold the queue


async def test_a_process_adopted_while_loading_holds_a_slot(w):
    w.deps.loads.set_limit(1)
    w.fx.add("a")
    w.fx.add("b")
    w.fx.health["a"] = w.fx.health["b"] = LOADING
    await w.up("a")
    await w.sup.runner("a").close()  # as if the daemon died while a loads
    w.sup._runners.clear()
    other = Supervisor(w.sup.home, replace(w.deps, loads=LoadGate(1)))  # the next daemon
    await other.runner("a").ask(Adopt(w.row("a")))
    assert other.loads() == {"a": [1, 1]}
    (p,) = await w.fx.prepare(["b"])
    assert (await other.runner("b").ask(Start(p))).outcome == "queued"
    w.fx.health["a"] = HEALTHY
    await w.fx.advance(0.6)
    assert w.row("b").state == S.STARTING
    await other.shutdown(stop_instances=False)


async def test_quick_early_looks_do_not_count_as_failures_sooner_than_interval(w):
    w.fx.add("a", healthcheck={"interval": 1, "retries": 2, "start_period": 0})
    w.fx.health["a"] = DOWN
    await w.up("a")
    await w.fx.advance(0.9)  # many looks, none counted yet
    assert len(w.fx.probes) >= 4 and w.row("a").state == S.STARTING
    await w.fx.advance(2.5)
    assert w.fx.stops  # two counted failures, an interval apart


async def test_eager_starts_are_probed_every_50_ms(w):
    w.fx.add("a")
    w.fx.health["a"] = LOADING
    await w.up("a", eager=True)
    await w.fx.advance(1.0, step=0.05)
    gaps = [b - a for (a, _, _), (b, _, _) in zip(w.fx.probes, w.fx.probes[1:], strict=False)]
    assert gaps and max(gaps) <= 0.051 + 1e-6


async def test_stop_drains_first_then_stops_and_nothing_restarts_it(w):
    w.fx.add("a", restart_policy={"mode": "always"})
    w.fx.health["a"] = HEALTHY
    await w.up("a")
    await w.fx.advance(0.3)
    assert await w.sup.down(["a"], timeout=7) == ["a"]
    assert w.settled == [("a", 7)] and w.board_log[-1] == set()
    r = w.row("a")
    assert (r.state, r.desired) == (S.STOPPED, Desired.STOPPED)
    assert w.kinds("a")[-2:] == ["stopping", "stopped"]
    await w.fx.advance(20)
    assert len(w.fx.procs) == 1 and not w.sup.active("a")
    assert await w.sup.down(["a"]) == []  # already stopped: nothing to stop


async def test_a_server_ignoring_sigterm_is_killed_after_stop_timeout(w):
    w.fx.add("a", stop_timeout=3)
    w.fx.ignore_term.add("a")
    await w.up("a")
    stopping = asyncio.ensure_future(w.sup.down(["a"]))
    await w.fx.settle()
    assert not stopping.done() and w.row("a").state == S.STOPPING
    await w.fx.advance(3.1)
    assert await stopping == ["a"]
    events = w.store.events("a")
    assert "killed after 3s without exiting" in events[-1].message


async def test_the_next_daemon_adopts_a_running_process_and_supervises_it(w):
    w.fx.add("a", restart_policy={"backoff_initial": 0.5})
    w.fx.health["a"] = HEALTHY
    await w.up("a")
    await w.fx.advance(0.3)
    pid = w.row("a").pid
    await w.sup.runner("a").close()  # as if the daemon died: the process lives on
    w.sup._runners.clear()
    other = Supervisor(w.sup.home, w.deps)
    await other.runner("a").ask(Adopt(w.row("a")))
    assert w.kinds("a")[-1] == "adopted" and w.row("a").supervised
    await w.fx.advance(1.1)
    assert other.healthy("a") and len(w.fx.procs) == 1 and w.row("a").pid == pid
    w.fx.proc("a").end(signal=9)  # and it restarts what it adopted
    await w.fx.advance(1)
    assert len(w.fx.procs) == 2
    await other.shutdown(stop_instances=False)


async def test_an_adopted_down_that_was_under_way_is_finished(w):
    w.fx.add("a")
    await w.up("a")
    row = w.row("a")
    row.desired = Desired.STOPPED
    w.store.save(row)
    await w.sup.runner("a").ask(Adopt(w.row("a")))
    assert w.row("a").state == S.STOPPED and not w.fx.running("a")


async def test_a_pending_restart_is_resumed_at_its_time(w):
    w.fx.add("a")
    await w.up("a")
    w.fx.proc("a").end(code=1)
    await w.fx.settle()
    at = w.row("a").next_restart_at
    await w.sup.runner("a").close()
    w.sup._runners.clear()
    await w.sup.runner("a").ask(Resume(at))
    await w.fx.advance(at - w.fx.t - 0.1)
    assert len(w.fx.procs) == 1
    await w.fx.advance(0.2)
    assert len(w.fx.procs) == 2 and w.row("a").state == S.STARTING


async def test_a_restart_whose_start_fails_backs_off_again(w):
    w.fx.add("a", restart_policy={"backoff_initial": 0.5, "max_retries": 2})
    await w.up("a")
    w.fx.spawn_fails["a"] = StartFailed("port taken")
    w.fx.proc("a").end(code=1)
    await w.fx.advance(5)
    assert w.row("a").state == S.FAILED and "start_failed" in w.kinds("a")


async def test_up_of_a_running_instance_starts_nothing_new(w):
    w.fx.add("a")
    await w.up("a")
    again = await w.up("a")
    assert again.outcome == "already running" and len(w.fx.procs) == 1


async def test_a_drain_takes_it_off_the_board_until_the_stop_that_follows(w):
    w.fx.add("a")
    w.fx.health["a"] = HEALTHY
    await w.up("a")
    await w.fx.advance(0.3)
    runner = w.sup.runner("a")
    runner.drain()  # what on-demand does to a victim or an idle instance
    assert "a" not in w.board.replicas and runner.healthy and w.fx.running("a")
    await w.sup.down(["a"])
    await w.up("a")  # the next run takes requests again: the stop ended the drain
    await w.fx.advance(0.3)
    assert "a" in w.board.replicas


async def test_rm_refuses_a_running_instance_unless_forced(w):
    w.fx.add("a")
    await w.up("a")
    with pytest.raises(UserError, match="is running"):
        await w.sup.rm("a", force=False)
    assert w.fx.running("a")
    await w.sup.rm("a", force=True)
    assert not w.fx.running("a") and w.fx.forgotten == ["a"] and w.store.get("a") is None


async def test_a_rolling_restart_keeps_a_replica_serving_throughout(w):
    for n in ("r1", "r2"):
        w.fx.add(n, model={"path": "m.gguf", "alias": "m"})
        w.fx.health[n] = HEALTHY
    await w.sup.up(["r1", "r2"])
    await w.fx.advance(0.3)
    w.board_log.clear()
    restarting = asyncio.ensure_future(w.sup.restart(["r1", "r2"], rolling=True))
    while not restarting.done():
        await w.fx.advance(0.1)
    results = await restarting
    assert [r.healthy for r in results] == [True, True] and len(w.fx.procs) == 4
    assert w.board_log and all(seen for seen in w.board_log)  # never none serving
    assert w.board_log[-1] == {"r1", "r2"}


async def test_a_rolling_restart_stops_at_a_replica_that_does_not_come_back(w):
    for n in ("r1", "r2"):
        w.fx.add(n, restart_policy={"mode": "no"})
        w.fx.health[n] = HEALTHY
    await w.sup.up(["r1", "r2"])
    await w.fx.advance(0.3)
    w.fx.health["r1"] = ERROR  # alive but failing its checks, and nothing restarts it
    restarting = asyncio.ensure_future(w.sup.restart(["r1", "r2"], rolling=True, timeout=5))
    while not restarting.done():
        await w.fx.advance(0.2)
    with pytest.raises(StartFailed, match="stopped at 'r1'"):
        await restarting
    assert len(w.fx.running("r2")) == 1 and w.fx.proc("r2").ref.pid == 4001  # untouched


async def test_probe_results_of_an_old_process_are_ignored(w):
    w.fx.add("a")
    w.fx.health["a"] = LOADING
    await w.up("a")
    await w.fx.advance(0.2)
    await w.sup.down(["a"])
    w.fx.health["a"] = HEALTHY
    await w.fx.advance(2)
    assert w.row("a").state == S.STOPPED  # no probe of the stopped run made it healthy


async def test_commands_to_one_runner_are_handled_one_at_a_time(w):
    w.fx.add("a", stop_timeout=2)
    w.fx.ignore_term.add("a")
    await w.up("a")
    down = asyncio.ensure_future(w.sup.down(["a"]))
    await w.fx.settle()  # the stop is under way
    (p,) = await w.fx.prepare(["a"])
    up = asyncio.ensure_future(w.sup.runner("a").ask(Start(p)))
    await w.fx.settle()
    assert not up.done()  # waits for the stop to finish
    await w.fx.advance(2.1)
    await down
    result = await up
    assert result.outcome == "started" and len(w.fx.running("a")) == 1
    kinds = [k for k in w.kinds("a") if k in ("starting", "stopped")]
    assert kinds == ["starting", "stopped", "starting"]  # never two at once


async def test_remove_of_an_unknown_row_is_fine(w):
    w.fx.add("a")
    await w.sup.runner("a").ask(Remove(force=False))
    assert w.fx.forgotten == ["a"]


async def test_a_stop_command_of_a_never_started_instance_records_it_stopped(w):
    w.fx.add("a")
    assert await w.sup.runner("a").ask(Stop()) is False
    assert w.row("a").desired == Desired.STOPPED


async def test_the_daemon_start_adopts_resumes_and_starts_each_on_its_own(w):
    for n in ("live", "pending", "wanted", "broken", "done"):
        w.fx.add(n)
    w.fx.health["live"] = HEALTHY
    await w.up("live")
    await w.up("pending")
    await w.up("broken")
    await w.sup.down(["done"])
    w.fx.proc("pending").end(code=1)
    await w.fx.settle()
    w.store.save(InstanceRow("wanted", Desired.RUNNING))  # nothing runs (as after a reboot)
    w.fx.proc("broken").end(code=1)
    await w.fx.settle()
    del w.fx.configs["broken"]  # its config went bad meanwhile
    for r in list(w.sup._runners.values()):
        await r.close()
    w.sup._runners.clear()
    await w.sup.start()
    await w.fx.advance(2)
    assert w.sup.healthy("live") and len(w.fx.running("live")) == 1  # adopted, not doubled
    assert w.fx.running("pending") and w.fx.running("wanted")  # resumed, started
    assert not w.fx.running("broken") and not w.fx.running("done")
    await w.fx.advance(5)  # housekeeping: the logs of what runs are rotated
    assert w.fx.rotated and w.fx.rotated[-1] == ["live", "pending", "wanted"]


EMFILE = OSError(24, "Too many open files")


async def test_probes_we_could_not_make_are_no_verdict_on_the_server(w):
    """Issue 24.2: out of descriptors, the daemon's probes fail; the server is fine."""
    w.fx.add("a")
    w.fx.health["a"] = HEALTHY
    await w.up("a")
    await w.fx.advance(0.5)
    w.fx.health["a"] = LOCAL
    await w.fx.advance(10)  # ten checks, none made
    assert w.row("a").state == S.HEALTHY and not w.fx.stops and "a" in w.board.replicas
    w.fx.health["a"] = HEALTHY
    await w.fx.advance(1.5)
    assert w.row("a").state == S.HEALTHY and len(w.fx.procs) == 1


async def test_a_stop_that_fails_is_recorded_and_supervision_goes_on(w):
    """Issue 24.2: stop_tree raising (EMFILE) ended the checks for good."""
    w.fx.add("a", restart_policy={"backoff_initial": 0.5})
    w.fx.health["a"] = HEALTHY
    await w.up("a")
    await w.fx.advance(0.5)
    w.fx.stop_faults.append(EMFILE)
    w.fx.health["a"] = ERROR
    await w.fx.advance(2.1)  # two failures: unhealthy, and the stop fails
    assert w.fx.stops == [("a", 5)] and w.fx.proc("a").alive
    assert "stop_failed" in w.kinds("a")
    await w.fx.advance(2.1)  # checked again: still failing, so stopped again, for real
    assert len(w.fx.stops) == 2 and not w.fx.procs[0].alive
    w.fx.health["a"] = HEALTHY
    await w.fx.advance(2)
    assert len(w.fx.procs) == 2 and w.row("a").state == S.HEALTHY


async def test_an_exit_watch_that_fails_is_made_anew_and_still_sees_the_kill(w):
    w.fx.add("a", restart_policy={"backoff_initial": 0.5})
    w.fx.health["a"] = HEALTHY
    w.fx.watch_faults.append(EMFILE)
    await w.up("a")
    await w.fx.advance(1.5)  # the watch failed, and runs again after a second
    w.fx.proc("a").end(signal=9)
    await w.fx.settle()
    assert "exited" in w.kinds("a")
    await w.fx.advance(1)
    assert len(w.fx.procs) == 2


async def test_a_kill_on_a_full_disk_is_kept_in_memory_and_restarted_once_there_is_room(w):
    w.fx.add("a")
    w.fx.health["a"] = HEALTHY
    await w.up("a")
    await w.fx.advance(0.3)
    fill(w.store)  # the state database can take nothing more
    w.fx.spawn_fails["a"] = disk_full(Path("/h/logs/a"), "The logs of instance 'a'")
    w.fx.proc("a").end(signal=9)
    await w.fx.settle()
    r = w.row("a")  # what the daemon's ps says: the truth, not "healthy" with a dead pid
    assert r.state == S.BACKOFF and r.last_exit["signal"] == 9 and r.restarts == 1
    await w.fx.advance(30)  # starts tried every 5 s, refused by the disk
    r = w.row("a")
    assert r.state == S.BACKOFF and r.restarts == 1 and len(w.fx.procs) == 1  # no crash counted
    said = [e for e in w.unsaved.snapshot()[1] if e[2] == "backoff"]
    assert len(said) == 2 and "The logs of instance 'a' cannot be written" in said[1][3]
    assert w.sup.status()["state_unsaved"]["changes"] > 0
    del w.fx.spawn_fails["a"]
    make_room(w.store)
    await w.fx.advance(6)
    assert w.row("a").state == S.HEALTHY and len(w.fx.procs) == 2
    assert not w.unsaved and w.sup.status()["state_unsaved"] is None
    disk = Store.open(w.store.path)  # every change is on disk now, in order, said once
    kinds = [e.kind for e in disk.events("a")]
    assert kinds == ["starting", "healthy", "exited", "backoff", "backoff", "starting", "healthy"]
    assert disk.events("a")[4].data["disk_full"] is True


async def test_a_start_that_must_wait_waits_in_backoff_saying_why_and_counts_no_crash(w):
    """`NotYet` (a cluster's pinned node lost, no room on any node): the start
    waits, said once per reason, tried again until it can happen."""
    from llama_orchestrator.errors import NotYet

    w.fx.add("a")
    w.fx.health["a"] = HEALTHY
    lost = NotYet("pinned to node 'n1', which is lost", retry_s=2.0)
    w.fx.spawn_fails["a"] = lost
    result = await w.up("a")
    assert result.outcome == "waiting" and result.notes == [lost.message]
    r = w.row("a")
    assert r.state == S.BACKOFF and r.desired == Desired.RUNNING and r.restarts == 0
    await w.fx.advance(7)  # tried every 2 s, still lost
    assert w.row("a").state == S.BACKOFF and w.row("a").restarts == 0 and not w.fx.procs
    w.fx.spawn_fails["a"] = NotYet("no room on any node", retry_s=2.0)
    await w.fx.advance(2.1)
    said = [e.message for e in w.store.events("a") if e.kind == "backoff"]
    assert said == [lost.message, "no room on any node"]  # each reason once
    del w.fx.spawn_fails["a"]
    await w.fx.advance(2.5)
    assert w.row("a").state == S.HEALTHY and len(w.fx.procs) == 1 and w.row("a").restarts == 0
    await w.sup.down(["a"])
    assert w.row("a").state == S.STOPPED
