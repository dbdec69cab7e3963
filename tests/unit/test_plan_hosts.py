"""Plan tasks on another machine (`"host"`): how a plan names one, what the
peer is sent, and how its answer is read (pure)."""

from __future__ import annotations

import json

import pytest

from llama_orchestrator.plans.hosts import Reply, one_task_plan, origin_of
from llama_orchestrator.plans.spec import HOST_PREFIX, PlanError, parse_plan


def plan(*tasks: dict) -> str:
    return json.dumps({"name": "p", "tasks": list(tasks)})


def parse(text: str, hosts: set[str] | None = frozenset({"rig2"}), known=frozenset({"m"})):
    return parse_plan(
        text, "p.json", known_models=set(known) if known is not None else None, hosts=hosts
    )


def problems(text: str, **kw) -> list[str]:
    with pytest.raises(PlanError) as exc:
        parse(text, **kw)
    return exc.value.problems


def test_a_shell_or_script_task_may_name_a_peer_to_run_on():
    p = parse(
        plan(
            {"id": "a", "kind": "shell", "command": ["echo", "hi"], "host": "rig2"},
            {"id": "b", "kind": "script", "command": ["train"], "gpus": 1, "host": "rig2"},
            {"id": "c", "kind": "shell", "command": ["echo"]},
        )
    )
    assert [t.host for t in p.tasks] == ["rig2", "rig2", None]
    # a task on a peer waits for a place there, not for a slot or a lease here
    assert [t.slot_key() for t in p.tasks] == [f"{HOST_PREFIX}rig2", f"{HOST_PREFIX}rig2", "shell"]


def test_a_host_that_is_no_peer_with_ssh_is_refused_naming_the_fix():
    (line,) = problems(plan({"id": "a", "kind": "shell", "command": ["x"], "host": "rig9"}))
    assert "host 'rig9' is no peer this daemon can run tasks on (rig2)" in line
    assert '"ssh": "ssh://user@host/home"' in line
    (line,) = problems(
        plan({"id": "a", "kind": "shell", "command": ["x"], "host": "r"}), hosts=set()
    )
    assert "(none has)" in line
    # hosts None: not checked here (the daemon checks)
    assert parse(plan({"id": "a", "kind": "shell", "command": ["x"], "host": "r"}), hosts=None)


def test_an_llm_task_goes_where_its_model_is_and_takes_no_host():
    (line,) = problems(
        plan({"id": "a", "kind": "llm", "model": "m", "prompt": "x", "host": "rig2"})
    )
    assert "the router picks the machine" in line and "remove host" in line


def test_models_are_not_checked_when_they_cannot_be_known_yet():
    """A daemon whose peers have not all answered yet does not refuse their models."""
    text = plan({"id": "a", "kind": "llm", "model": "theirs", "prompt": "x"})
    assert "theirs" in problems(text)[0]
    assert parse(text, known=None).tasks[0].model == "theirs"


def test_the_peer_is_sent_the_task_alone_filled_in_and_tried_once():
    p = parse(
        plan(
            {"id": "up", "kind": "shell", "command": ["echo"]},
            {
                "id": "t",
                "kind": "script",
                "command": ["train", "{{up}}"],
                "depends_on": ["up"],
                "host": "rig2",
                "gpus": [1],
                "vram_mib": 4000,
                "cwd": "work",
                "env": {"A": "1"},
                "timeout": 60,
                "retries": 5,
                "priority": 9,
            },
        )
    )
    origin = origin_of("r1", "t", "box")
    sent = json.loads(one_task_plan(p.task("t"), ["train", "its output"], origin))
    assert sent == {
        "name": "r1/t from box",
        "tasks": [
            {
                "id": "t",
                "kind": "script",
                "command": ["train", "its output"],
                "env": {"A": "1"},
                "timeout": 60,
                "retries": 0,
                "priority": 9,
                "cwd": "work",
                "gpus": [1],
                "vram_mib": 4000,
            }
        ],
    }
    # what the peer's daemon would parse: a valid plan with no host and no dependency
    there = parse_plan(json.dumps(sent), "from-peers.json", known_models=set())
    assert there.tasks[0].host is None and there.tasks[0].depends_on == ()


def test_the_peers_answer_is_its_run_then_its_end():
    reply = Reply()
    reply.feed('{"run": "ab12"}\n')
    assert reply.run == "ab12" and reply.end is None
    # no end: what the far llama-orch said last, or its exit code
    said = "Started the daemon.\nerror: No plan file x.\n"
    assert reply.error("rig2", said, 2) == "on rig2: No plan file x."
    assert reply.error("rig2", "", 3) == "on rig2: exit code 3"
    reply = Reply()
    for line in ['{"run": "ab12"}', "some noise", "[1]", '{"state": "completed", "output": "x"}']:
        reply.feed(line)
    assert reply.run == "ab12" and reply.error("rig2") is None
    reply.feed('{"state": "failed", "error": "exit code 3: boom"}')
    assert reply.error("rig2") == "on rig2: exit code 3: boom"
    reply.feed('{"state": "cancelled", "error": null}')
    assert reply.error("rig2") == "on rig2: cancelled"
