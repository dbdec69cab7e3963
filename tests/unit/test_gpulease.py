"""GPU leases for script tasks, the decisions: which cards, each card's state,
the script's environment; and the plan check that sends GPU work to them."""

from __future__ import annotations

import pytest

from llama_orchestrator.errors import UserError
from llama_orchestrator.gpus.leases import (
    Card,
    Choice,
    Occupant,
    card_state,
    choose,
    lease_env,
    never,
    occupants,
    refuse_leased,
)
from llama_orchestrator.plans.spec import PlanError, gpu_hint, parse_plan
from llama_orchestrator.states import InstanceState as S
from llama_orchestrator.store.rows import InstanceRow, Lease

IDLE_YIELDS = Occupant("big", S.HEALTHY, may_yield=True, busy=False)
KEEPS = Occupant("chat", S.HEALTHY, may_yield=False, busy=False)


def card(i: int, *occ: Occupant, leased: bool = False, free: int = 6144) -> Card:
    return Card(i, 6144, free, occ, leased)


def test_a_free_card_goes_first_then_one_whose_instance_yields():
    assert choose(1, None, [card(0, IDLE_YIELDS), card(1)]) == Choice((1,))
    assert choose(1, None, [card(0, IDLE_YIELDS)]) == Choice((0,), ("big",))
    assert choose(2, None, [card(0, IDLE_YIELDS), card(1)]) == Choice((1, 0), ("big",))
    assert choose((0,), None, [card(0, IDLE_YIELDS), card(1)]) == Choice((0,), ("big",))


@pytest.mark.parametrize(
    ("cards", "want", "vram", "said"),
    [
        ([], 1, None, "no GPU was found"),
        ([card(0, KEEPS)], 1, None, "held by instance 'chat' (healthy), which does not yield"),
        ([card(0, Occupant("big", S.HEALTHY, True, busy=True))], 1, None, "busy (healthy)"),
        ([card(0, Occupant("big", S.STARTING, True, False))], 1, None, "busy (starting)"),
        ([card(0, leased=True)], 1, None, "leased to another script task"),
        ([card(0)], (3,), None, "GPU 3 is not on this machine"),
        ([card(0)], 2, None, "needs 2 GPUs and this machine has 1"),
        ([card(0, free=1000)], 1, 4000, "GPU 0 has 1000 MiB free, the task needs 4000 MiB"),
    ],
)
def test_a_task_that_cannot_have_its_cards_now_is_told_why(cards, want, vram, said):
    why = choose(want, vram, cards)
    assert isinstance(why, str) and said in why


def test_a_card_yielded_counts_its_whole_memory_and_a_named_one_is_not_swapped():
    assert choose(1, 5000, [card(0, IDLE_YIELDS, free=500)]) == Choice((0,), ("big",))
    assert isinstance(choose((0,), None, [card(0, KEEPS), card(1)]), str)  # [0] means 0


def test_each_card_follows_the_lease_state_machine():
    lease = Lease(0, "r1", "t", 1.0)
    assert card_state(None, []) == "idle"
    assert card_state(None, [Occupant("a", S.QUEUED, False, False)]) == "booting_llm"
    assert card_state(None, [Occupant("a", S.STARTING, False, False)]) == "booting_llm"
    assert card_state(None, [Occupant("a", S.HEALTHY, False, False)]) == "llm_ready"
    assert card_state(None, [Occupant("a", S.HEALTHY, False, True)]) == "llm_busy"
    assert card_state(None, [Occupant("a", S.STOPPED, False, False)]) == "idle"
    assert card_state(lease, [IDLE_YIELDS]) == "booting_script"  # still yielding
    lease.state = "active"
    assert card_state(lease, []) == "script_busy"


def test_occupants_come_from_the_cards_a_run_got_else_its_config():
    rows = [
        InstanceRow("a", state=S.HEALTHY, gpu_devices=[1]),
        InstanceRow("b", state=S.BACKOFF),  # restarts soon: holds its pinned card
        InstanceRow("c", state=S.STOPPED, gpu_devices=[0]),
    ]
    on = occupants(rows, lambda n: {"b": [0]}.get(n, []), lambda n: n == "a", lambda n: False)
    assert on == {
        1: [Occupant("a", S.HEALTHY, True, False)],
        0: [Occupant("b", S.BACKOFF, False, False)],
    }


def test_a_script_sees_only_its_cards_whatever_its_runtime_and_nothing_else_starts_there():
    env = lease_env([2])
    for var in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "GGML_VK_VISIBLE_DEVICES"):
        assert env[var] == "2"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert lease_env([0, 3])["CUDA_VISIBLE_DEVICES"] == "0,3"
    refuse_leased([Lease(2, "r1", "asr", 1.0)], "big", [0, 1])  # another card: fine
    with pytest.raises(UserError, match="GPU 2 is leased to script task 'asr' of plan run r1"):
        refuse_leased([Lease(2, "r1", "asr", 1.0)], "big", [2])


def _plan(*tasks: dict) -> str:
    import json

    return json.dumps({"tasks": list(tasks)})


def test_a_script_task_names_its_gpus_and_gpu_work_in_a_shell_task_is_not_guessed():
    plan = parse_plan(
        _plan(
            {"id": "asr", "kind": "script", "gpus": 1, "vram_mib": 3000,
             "command": ["whisper", "talk.mp3"]},
            {"id": "ocr", "kind": "script", "gpus": [2], "command": ["python", "ocr.py"]},
            {"id": "cuda-named", "kind": "shell", "gpus": 0, "command": ["cat", "cuda.txt"]},
        ),
        "p.json",
        known_models=set(),
    )  # fmt: skip
    asr, ocr, _ = plan.tasks
    assert (asr.slot_key(), asr.gpus, asr.vram_mib, ocr.gpus) == ("script", 1, 3000, (2,))
    assert type(plan).from_json(plan.to_json()) == plan  # as the store keeps it
    with pytest.raises(PlanError) as exc:
        parse_plan(
            _plan(
                {"id": "a", "kind": "shell", "command": ["whisper", "x.mp3"]},
                {"id": "b", "kind": "shell", "command": ["python", "t.py", "--device", "cuda"]},
                {"id": "c", "kind": "script", "command": ["python", "t.py"]},
                {"id": "d", "kind": "shell", "gpus": 1, "command": ["python", "t.py"]},
                {"id": "e", "kind": "llm", "model": "m", "prompt": "x", "gpus": 1},
            ),
            "p.json",
            known_models={"m"},
        )
    text = str(exc.value)
    assert "tasks[0] (a): its command looks like GPU work ('whisper')" in text
    assert '"kind": "script", "gpus": 1' in text and '"gpus": 0 if it needs none' in text
    assert "tasks[1] (b): its command looks like GPU work ('--device cuda')" in text
    assert 'tasks[2] (c): a script task needs the GPUs it runs on: "gpus": 1' in text
    assert 'tasks[3] (d): a shell task gets no GPU; make it "kind": "script"' in text
    assert "tasks[4] (e): gpus and vram_mib are for script tasks" in text
    assert gpu_hint(["echo", "hello"]) is None and gpu_hint(["/opt/bin/nvidia-smi"])


def test_device_id_auto_never_picks_a_leased_card(tmp_path):
    import json
    import sys

    from llama_orchestrator.config.prepare import prepare
    from llama_orchestrator.gpus.discover import Discovery, GpuInfo
    from llama_orchestrator.home import Home
    from llama_orchestrator.models.tiny import write_tiny_model

    home = Home(tmp_path / "home")
    folder = home.instance_dir("a")
    folder.mkdir(parents=True)
    model = write_tiny_model(tmp_path / "m.gguf")
    cfg = {
        "model": {"path": str(model)},
        "server": {"port": 8123},
        "gpu": {"backend": "cuda", "device_id": "auto"},
        "binary": sys.executable,
    }
    home.config_path("a").write_text(json.dumps(cfg))
    cards = [GpuInfo(0, "c0", "cuda", 6144, 3000), GpuInfo(1, "c1", "cuda", 6144, 0)]

    def find() -> Discovery:
        return Discovery("nvidia-smi", cards)

    (free,) = prepare(home, ["a"], set(), {}, find)
    assert free.devices == [1]  # the most free VRAM
    (other,) = prepare(home, ["a"], set(), {}, find, leased=frozenset({1}))
    assert other.devices == [0]  # card 1 is a script's now
    with pytest.raises(UserError, match="Every GPU is leased to a plan's script task"):
        prepare(home, ["a"], set(), {}, find, leased=frozenset({0, 1}))


@pytest.mark.parametrize(
    ("want", "have", "why"),
    [
        ((3,), [0], "GPU 3 is not on this machine (it has GPU 0)"),
        ((0, 5), [0, 1], "GPU 5 is not on this machine (it has GPU 0, 1)"),
        (2, [0], "it needs 2 GPUs and this machine has 1"),
        (1, [], "no GPU was found on this machine"),
        ((0,), [], "no GPU was found on this machine"),
        (1, [0], None),
        ((1,), [0, 1], None),
        (2, [0, 1], None),
    ],
)
def test_never_is_what_no_wait_can_mend(want, have, why):
    assert never(want, have) == why
    cards = [Card(i, 6144, 6144) for i in have]
    got = choose(want, None, cards)
    assert (got == why) if why else not isinstance(got, str)  # choose says the same
