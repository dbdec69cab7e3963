"""router.routes: llama-server's paths, model names, CORS (pure)."""

from __future__ import annotations

import pytest

from llama_orchestrator.names import alias_names, serves
from llama_orchestrator.router.routes import (
    Unresolved,
    cors_headers,
    presented_key,
    query_value,
    resolve,
    takes_slot,
    without_param,
)


@pytest.mark.parametrize(
    "method,path,slot",
    [
        ("POST", "/v1/chat/completions", True),
        ("POST", "/chat/completions", True),
        ("POST", "/completions", True),
        ("POST", "/completion", True),
        ("POST", "/v1/responses", True),
        ("POST", "/infill", True),
        ("POST", "/v1/rerank", True),
        ("POST", "/embeddings", True),
        ("POST", "/v1/messages", True),
        ("POST", "/v1/some-new-generation-endpoint", True),  # unknown POST: queued for a slot
        ("POST", "/tokenize", False),
        ("POST", "/apply-template", False),
        ("POST", "/v1/chat/completions/input_tokens", False),
        ("POST", "/v1/messages/count_tokens", False),
        ("POST", "/slots/0", False),
        ("POST", "/props", False),
        ("GET", "/props", False),
        ("GET", "/", False),
        ("GET", "/v1/chat/completions", False),
    ],
)
def test_which_requests_hold_a_slot(method: str, path: str, slot: bool) -> None:
    assert takes_slot(method, path) is slot


ONE = {"qwen", "tags:chat"}
TWO = {"qwen", "llama", "tags:chat"}


def test_a_name_served_is_itself_and_tags_are_put_in_order() -> None:
    assert resolve("llama", TWO) == "llama"
    assert resolve("tags: chat", {"qwen", "tags:chat", "tags:chat,gpu"}) == "tags:chat"
    assert resolve("tags:gpu,chat", {"tags:chat,gpu", "qwen"}) == "tags:chat,gpu"


@pytest.mark.parametrize("named", [None, "", "gpt-3.5-turbo", "text-embedding-3-small", 7])
def test_with_one_model_served_any_name_means_it_as_llama_server_answers(named: object) -> None:
    expected = "qwen" if named is None or isinstance(named, str) else None
    got = resolve(named, ONE)
    if expected is None:  # not a string at all: nothing is named
        assert isinstance(got, Unresolved) and got.status == 400
    else:
        assert got == expected


def test_strict_names_refuse_an_unknown_name_but_not_a_missing_one() -> None:
    got = resolve("gpt-4o", ONE, strict=True)
    assert isinstance(got, Unresolved) and got.status == 404
    assert "'gpt-4o' does not exist; available: qwen." in got.message
    assert resolve(None, ONE, strict=True) == "qwen"
    assert resolve("", ONE, strict=True) == "qwen"


def test_with_several_served_an_unknown_name_is_404_and_none_is_400_listing_them() -> None:
    unknown = resolve("gpt-4o", TWO)
    assert isinstance(unknown, Unresolved) and unknown.status == 404
    assert unknown.available == ["llama", "qwen"]
    missing = resolve(None, TWO)
    assert isinstance(missing, Unresolved) and missing.status == 400
    assert "this router has several" in missing.message
    nothing = resolve("x", set())
    assert isinstance(nothing, Unresolved) and nothing.status == 404
    empty = resolve(None, set())
    assert isinstance(empty, Unresolved) and "No model is configured here yet" in empty.message


def test_the_model_map_renames_hard_coded_names_first() -> None:
    names = {"gpt-4o-mini": "qwen", "embed": "tags:chat"}
    assert resolve("gpt-4o-mini", TWO, names) == "qwen"
    assert resolve("embed", TWO, names) == "tags:chat"
    got = resolve("gpt-4", TWO, names)
    assert isinstance(got, Unresolved) and got.status == 404


def test_an_alias_list_is_several_names_of_one_model() -> None:
    assert alias_names("a, b,c") == ("a", "b", "c")
    assert alias_names("solo") == ("solo",)
    assert alias_names(",") == (",",)
    assert serves("b", "a,b,c", ()) and serves("a,b,c", "a,b,c", ())
    assert not serves("d", "a,b,c", ())
    known = {"a", "b", "c"}
    assert resolve("b", known, served=["a,b,c"]) == "b"
    # one model under three names: an unknown one still means it
    assert resolve("gpt-4", known, served=["a,b,c"]) == "a"
    # two models: it does not
    assert isinstance(resolve("gpt-4", known | {"d"}, served=["a,b,c", "d"]), Unresolved)


def test_query_parameters_are_read_and_removed() -> None:
    assert query_value("action=save&instance=a", "instance") == "a"
    assert query_value("model=x%20y", "model") == "x y"
    assert query_value("models=1", "model") is None
    assert query_value("", "model") is None
    assert without_param("action=save&instance=a&filename=s.bin", "instance") == (
        "action=save&filename=s.bin"
    )
    assert without_param("instance=a", "instance") == ""


def test_cors_answers_only_allowed_origins() -> None:
    allowed = {"http://localhost:5173"}
    assert cors_headers("http://evil.example", allowed) is None
    assert cors_headers(None, allowed) is None
    simple = cors_headers("http://localhost:5173", allowed)
    assert simple == [
        ("access-control-allow-origin", "http://localhost:5173"),
        ("vary", "Origin"),
    ]
    pre = dict(cors_headers("http://LOCALHOST:5173/", allowed, "content-type, authorization"))
    assert pre["access-control-allow-origin"] == "http://LOCALHOST:5173/"
    assert pre["access-control-allow-headers"] == "content-type, authorization"
    assert "POST" in pre["access-control-allow-methods"]
    assert cors_headers("http://any.example", {"*"}) is not None  # every page: "*"


@pytest.mark.parametrize(
    "headers,key",
    [
        ({"authorization": "Bearer k1"}, "k1"),
        ({"authorization": "bearer k1 "}, "k1"),
        ({"x-api-key": "k2"}, "k2"),
        ({"authorization": "Basic abc", "x-api-key": "k3"}, "k3"),
        ({}, ""),
    ],
)
def test_a_key_is_taken_from_bearer_or_x_api_key(headers: dict[str, str], key: str) -> None:
    assert presented_key(headers) == key
