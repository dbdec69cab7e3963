from pathlib import Path

import pytest

from llama_orchestrator.config.fit import overcommits, pick_devices
from llama_orchestrator.errors import UserError
from llama_orchestrator.gpus.alerts import alerts, record_changes
from llama_orchestrator.gpus.discover import parse_nvidia_smi
from llama_orchestrator.models.gguf import MIB, read_model
from llama_orchestrator.store.database import Store
from llama_orchestrator.units import human_bytes, human_count

OUTPUTS = Path(__file__).parents[1] / "fakes" / "gpu_outputs"
GIB = 1024 * MIB


def cards(name="five_1060.csv"):
    return parse_nvidia_smi((OUTPUTS / name).read_text())


def test_overcommit_names_instances_and_numbers():
    demands = {"qwen": {0: int(3.5 * GIB)}, "llama": {0: int(3.0 * GIB), 1: GIB}, "small": {1: GIB}}
    (oc,) = overcommits(demands, cards())
    assert oc.device == 0 and oc.needed_bytes == int(6.5 * GIB)
    msg = oc.message()
    assert (
        "GPU 0 (NVIDIA GeForce GTX 1060 6GB, 6.0 GB) cannot hold qwen (3.5 GB) + llama (3.0 GB) = 6.5 GB"
        in msg
    )
    assert (
        overcommits({"a": {9: 10 * GIB}}, cards()) == []
    )  # missing cards are gpus.alerts' business


@pytest.fixture()
def kv_heavy(kv_heavy_model):
    return read_model(kv_heavy_model)


def test_pick_devices_most_free_first_then_fewest(kv_heavy):
    assert pick_devices(kv_heavy, 1_500_000, 1, None, cards()) == [2]  # 2.9 GB: the emptiest card
    assert pick_devices(kv_heavy, 4_000_000, 1, None, cards()) == [0, 2]  # 7.6 GB: two cards
    with pytest.raises(UserError, match="all GPUs together have"):
        pick_devices(kv_heavy, 20_000_000, 1, None, cards())
    with pytest.raises(UserError, match="found no GPU"):
        pick_devices(kv_heavy, 1000, 1, None, [])


def test_alerts_hot_and_missing_cards():
    hot = alerts(cards("one_hot.csv"), {1: ["qwen"]}, 85)
    assert [(a.device, a.kind) for a in hot] == [(1, "gpu_hot")]
    assert (
        hot[0].message
        == "GPU 1 (NVIDIA GeForce GTX 1060 6GB) is at 90 °C, over the 85 °C threshold (used by qwen)"
    )
    missing = alerts(cards("card3_missing.csv"), {0: ["big"], 3: ["big"]}, 85)
    assert [(a.device, a.kind) for a in missing] == [(3, "gpu_missing")]
    assert alerts(cards(), {0: ["a"]}, 85) == []
    # a card never reported did not fall off the bus: nothing said about it
    assert alerts([], {0: ["gpu1"]}, 85, seen=set()) == []
    assert [a.kind for a in alerts([], {0: ["gpu1"]}, 85, seen={0})] == ["gpu_missing"]


def test_the_store_remembers_the_cards_it_was_shown(tmp_path):
    store = Store.open(tmp_path / "s.sqlite")
    assert store.gpus_seen() == set()
    store.mark_gpus_seen([("cuda", 0, "GTX 1060"), ("cuda", 3, "GTX 1060")])
    store.mark_gpus_seen([("cuda", 0, "GTX 1060")])
    assert store.gpus_seen() == {0, 3}


def test_record_changes_records_start_once_and_the_end(tmp_path):
    store = Store.open(tmp_path / "s.sqlite")
    hot = alerts(cards("one_hot.csv"), {}, 85)
    assert record_changes(store, hot, {0, 1, 2, 3, 4}) == hot
    assert record_changes(store, hot, {0, 1, 2, 3, 4}) == []  # still hot: nothing new
    record_changes(store, [], {0, 1, 2, 3, 4})
    assert [e.kind for e in store.events()] == ["gpu_hot", "gpu_ok"]
    assert store.events()[0].data == {"device": 1}


def test_sizes_and_counts_for_people():
    assert human_bytes(253 * MIB) == "253 MiB" and human_bytes(5.1 * GIB) == "5.1 GB"
    assert human_bytes(148_448) == "145 KiB"
    assert [human_count(n) for n in (7_241_732_096, 268_098_176, 35_168, 12)] == [
        "7.24B",
        "268M",
        "35K",
        "12",
    ]
