"""The router's choice: pure, every case by example."""

import json

from llama_orchestrator.names import offers, serves, tag_model, tag_set
from llama_orchestrator.router.balance import (
    Replica,
    candidates,
    least_busy,
    lightest,
    matches,
    model_names,
)


def rep(name, alias="m", slots=2, tags=()):
    return Replica(name, alias, tuple(tags), "127.0.0.1", 8000, slots)


A, B, C = rep("a"), rep("b", slots=4), rep("c", alias="other", tags=("worker",))


def test_models_match_by_alias_or_tag():
    assert matches("m", A) and not matches("m", C)
    assert matches("tags:worker", C) and not matches("tags:worker", A)
    assert matches("other", C) and not matches("tags:", A)
    assert candidates("m", [A, B, C]) == [A, B]
    assert model_names([A, B, C]) == ["m", "other"]


def test_an_alias_list_is_one_model_listed_by_its_first_name_in_order():
    listed = rep("d", alias="qwen, default,big")
    assert matches("default", listed) and matches("big", listed) and matches("qwen", listed)
    assert not matches("qwen, default,big", rep("e", alias="qwen"))
    assert model_names([A, listed]) == ["big", "m"]


def test_the_least_busy_share_of_slots_wins():
    assert least_busy([A, B], {}) == A  # tie on 0: by name
    assert least_busy([A, B], {"a": 1}) == B  # 1/2 busy vs 0/4
    assert least_busy([A, B], {"a": 1, "b": 2}) == A  # 1/2 = 2/4: fewer in flight
    assert least_busy([A, B], {"a": 1, "b": 3}) == A  # 1/2 < 3/4


def test_full_or_excluded_replicas_are_not_chosen():
    assert least_busy([A, B], {"a": 2, "b": 4}) is None
    assert least_busy([A, B], {"b": 4}) == A
    assert least_busy([A, B], {}, frozenset({"a"})) == B
    assert least_busy([A, B], {}, frozenset({"a", "b"})) is None
    assert least_busy([], {}) is None
    assert least_busy([rep("z", slots=0)], {}) == rep("z", slots=0)  # at least one slot


def test_a_tags_name_asks_for_an_instance_that_carries_every_tag_listed():
    assert tag_set("tags:worker, gpu,") == {"worker", "gpu"} and tag_set("qwen") == frozenset()
    assert tag_model(["worker", "gpu", "worker"]) == "tags:gpu,worker"  # one name, any order
    assert serves("tags:worker", "a", ("worker", "gpu"))
    assert serves("tags:gpu,worker", "a", ("worker", "gpu"))
    assert not serves("tags:gpu,worker", "a", ("worker",))
    assert not serves("tags:", "a", ("worker",))  # no tag named: nothing matches


def test_offers_checks_one_instance_carries_all_of_the_tags():
    from llama_orchestrator.config.parse import parse_config
    from llama_orchestrator.config.validate import offered_names

    def cfg(tags: list[str]):
        text = {"model": {"path": "m.gguf"}, "server": {"port": 9001}, "tags": tags}
        return parse_config(json.dumps(text), "c", "x")

    known = offered_names({"a": cfg(["worker", "gpu"]), "b": cfg(["cpu"])})
    assert offers(known, "tags:gpu") and offers(known, "tags:worker,gpu") and offers(known, "a")
    assert not offers(known, "tags:gpu,cpu")  # each is offered, but by different instances
    assert not offers(known, "tags:") and not offers(known, "ghost")


def test_a_request_that_takes_no_slot_goes_to_the_least_loaded_even_when_full():
    assert lightest([A, B], {"a": 2, "b": 4}) == A  # both full: still answered (2/2 = 4/4, by name)
    assert lightest([A, B], {"a": 2, "b": 3}) == B  # 3/4 < 2/2
    assert lightest([], {}) is None


def test_an_instances_cors_and_hop_by_hop_headers_are_not_passed_on():
    from llama_orchestrator.router.proxy import pass_on

    raw, streamed = pass_on(
        [
            (b"Access-Control-Allow-Origin", b""),
            (b"access-control-allow-headers", b"*"),
            (b"Connection", b"keep-alive"),
            (b"Content-Type", b"text/event-stream"),
            (b"Server", b"llama.cpp"),
        ]
    )
    assert raw == b"Content-Type: text/event-stream\r\nServer: llama.cpp\r\n" and streamed
