"""The daemon's GPU leases on the fake world (fake processes and cards, a
clock the test moves): yield, run, restore; a user's down during a lease;
a lease left by a killed daemon."""

from __future__ import annotations

import pytest

from llama_orchestrator.daemon.leases import Leases
from llama_orchestrator.engine.health import HEALTHY
from llama_orchestrator.errors import UserError
from llama_orchestrator.gpus.discover import GpuInfo
from llama_orchestrator.plans.spec import Task
from llama_orchestrator.states import InstanceState as S
from llama_orchestrator.store.rows import Lease

ASR = Task(id="asr", kind="script", gpus=1, command=("whisper",))


async def _world(w, may_yield: bool = True) -> Leases:
    w.fx.cards = lambda: [GpuInfo(0, "GTX 1060 6GB", "cuda", 6144, 0)]
    w.fx.add("big", gpu={"backend": "cuda", "device_id": 0}, yield_to_scripts=may_yield)
    w.fx.health["big"] = HEALTHY
    await w.up("big")
    await w.fx.advance(0.3)
    await w.sup.refresh()
    leases = Leases(w.sup, busy=w.slots.busy)
    await leases.refresh()
    return leases


async def test_an_idle_instance_yields_its_card_and_comes_back_when_the_lease_ends(w):
    leases = await _world(w)
    got = leases.reserve("r1", ASR)
    assert not isinstance(got, str) and [(x.gpu, x.yielded) for x in got] == [(0, ["big"])]
    assert w.store.leases()[0].state == "yielding"
    assert isinstance(leases.reserve("r1", ASR), str)  # the card is taken now
    env = await leases.begin(got)
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and w.row("big").state == S.STOPPED
    assert w.fx.stops and w.store.leases()[0].state == "active"
    assert leases.holds_for("big")  # the router holds its requests meanwhile
    with pytest.raises(UserError, match="leased to script task 'asr'"):
        await w.sup.up(["big"])  # nothing else starts on the card
    await leases.end(got, "the task is done")
    assert w.store.leases() == [] and not leases.holds_for("big")
    await w.fx.advance(0.3)
    assert w.row("big").state == S.HEALTHY and len(w.fx.procs) == 2
    assert [k for k in w.kinds("big") if k.startswith("instance_")] == [
        "instance_yielded",
        "instance_restored",
    ]


async def test_a_user_down_during_the_lease_outlasts_its_end(w):
    leases = await _world(w)
    got = leases.reserve("r1", ASR)
    assert not isinstance(got, str)
    await leases.begin(got)
    leases.keep_down(["big"])  # the user's `down big` while the script runs
    await leases.end(got, "the task is done")
    await w.fx.advance(0.3)
    assert w.row("big").state == S.STOPPED and len(w.fx.procs) == 1


async def test_a_busy_or_unyielding_instance_makes_the_task_wait_and_says_why(w):
    leases = await _world(w, may_yield=False)
    why = leases.reserve("r1", ASR)
    assert isinstance(why, str) and "which does not yield to scripts" in why
    assert w.store.leases() == [] and w.row("big").state == S.HEALTHY


async def test_a_killed_daemons_lease_is_given_back_and_what_yielded_restored(w):
    leases = await _world(w)
    await w.sup.down(["big"])  # as the dead daemon left it: yielded, its card leased
    w.store.save_leases([Lease(0, "r1", "asr", w.fx.t, "active", ["big"])])
    await leases.start()
    await w.fx.advance(0.3)
    assert w.store.leases() == [] and w.row("big").state == S.HEALTHY
    await leases.close()


async def test_a_task_asking_for_cards_the_machine_lacks_is_told_it_never_will_get_them(w):
    leases = await _world(w)
    named = Task(id="asr", kind="script", gpus=(3,), command=("whisper",))
    two = Task(id="asr", kind="script", gpus=2, command=("whisper",))
    assert leases.never(named) == "GPU 3 is not on this machine (it has GPU 0)"
    assert leases.never(two) == "it needs 2 GPUs and this machine has 1"
    assert leases.never(ASR) is None  # one card, held: a wait, not a never
    w.fx.cards = lambda: []
    await leases.refresh()
    assert leases.never(ASR) == "no GPU was found on this machine"
