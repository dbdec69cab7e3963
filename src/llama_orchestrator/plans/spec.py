"""Plan files (DESIGN §7): parsing and every check, before anything runs.

A plan is JSON: `{"name", "vars": {NAME: default}, "tasks": [...]}`; a task
has `id`, `kind` (llm, shell or script), `depends_on`, `priority` 1-10,
`retries`, `timeout`, `backoff`; llm: `model` (an alias or `tags:<tag>`) or
`tags`, `prompt`, `system`, `max_tokens`, `temperature`, `untrusted`,
`check` (a regex or a JSON Schema its output must pass), `escalate` ({"to":
an upstream's alias, "after_failures": N}: the next attempts go there, with
the failed ones handed over as data), `tier` ("external": at once),
`sensitive` (kept out of the plan's `log_samples`); shell:
`command` (an argv list), `cwd`, `env`; script: a shell task that needs GPUs,
`gpus` (how many, or which: `[2]`) and `vram_mib`, run on cards the daemon
leases to it (daemon.leases). Prompts (and shell arguments) may reference
`{{task_id}}` (a dependency's output), `{{vars.NAME}}` and `{{file:PATH}}`.

Pure: the models a plan may name and the --var values are passed in; every
problem is collected into one PlanError (exit 2).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError

from llama_orchestrator.errors import UserError
from llama_orchestrator.names import TAG_PREFIX, offers, tag_model, tag_set

__all__ = [
    "Plan",
    "Task",
    "PlanError",
    "parse_plan",
    "parse_vars",
    "references",
    "TEMPLATE",
]

#: {{ name }}: a task id, vars.NAME or file:PATH
TEMPLATE = re.compile(r"\{\{\s*([^{}\s]+)\s*\}\}")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class PlanError(UserError):
    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        head = f"The plan {source} has {len(problems)} problem{'s' * (len(problems) > 1)}:"
        super().__init__("\n".join([head, *(f"  {p}" for p in problems)]))


class _Check(BaseModel):
    model_config = ConfigDict(extra="forbid")

    regex: str | None = None
    json_schema: dict[str, Any] | None = None


class _Escalate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: str
    after_failures: int = Field(2, ge=1)


class _TaskModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    kind: Literal["llm", "shell", "script"]
    depends_on: list[str] = []
    priority: int = Field(5, ge=1, le=10)
    retries: int = Field(3, ge=0, le=100)
    timeout: float = Field(300, gt=0)
    backoff: float = Field(1.0, ge=0, description="seconds before the first retry; doubles")
    # llm
    model: str | None = None
    #: what the instance must carry: one tag, or a list (it carries every one)
    tags: str | list[str] | None = None
    prompt: str | None = None
    system: str | None = None
    max_tokens: int = Field(256, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    untrusted: list[str] = []
    #: what the output must be: {"regex": "..."} or {"json_schema": {...}}
    check: _Check | None = None
    #: after this many failed local attempts, the next go to an external upstream
    escalate: _Escalate | None = None
    #: "external": every attempt goes to `escalate.to` at once
    tier: Literal["local", "external"] = "local"
    #: its prompt and answer stay out of the training log (`log_samples`)
    sensitive: bool = False
    # shell and script
    command: list[str] | None = None
    cwd: str | None = None
    env: dict[str, str] = {}
    # script: how many cards, or which; 0 on a shell task says it needs none
    gpus: NonNegativeInt | list[NonNegativeInt] | None = None
    vram_mib: int | None = Field(None, ge=1)
    #: shell and script: the peer (llama-orch.json's "peers") whose daemon runs it
    host: str | None = None


class _PlanModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    vars: dict[str, str] = {}
    #: prompt, answer, tier, tokens, elapsed and success of every llm attempt,
    #: as JSON lines in the run folder (samples.jsonl)
    log_samples: bool = False
    tasks: list[dict[str, Any]] = Field(min_length=1)


#: the slot key of a task another machine runs (`host`)
HOST_PREFIX = "host:"


@dataclass(frozen=True)
class Task:
    id: str
    kind: str
    depends_on: tuple[str, ...] = ()
    priority: int = 5
    retries: int = 3
    timeout: float = 300
    backoff: float = 1.0
    #: what the router is asked for: an alias or tags:<tag>[,<tag>...] (llm tasks)
    model: str | None = None
    prompt: str = ""
    system: str | None = None
    max_tokens: int = 256
    temperature: float | None = None
    untrusted: tuple[str, ...] = ()
    command: tuple[str, ...] = ()
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    #: script: how many cards (an int) or which (a tuple of indices)
    gpus: int | tuple[int, ...] | None = None
    vram_mib: int | None = None
    #: shell and script: the peer that runs it (None: this machine)
    host: str | None = None
    #: llm: {"regex": ...} or {"json_schema": ...} its output must pass
    check: dict[str, Any] | None = None
    #: llm: the external model, and after how many failed local attempts it answers
    escalate_to: str | None = None
    after_failures: int = 2
    tier: str = "local"
    sensitive: bool = False

    def model_for(self, attempt: int) -> str | None:
        """The model attempt number `attempt` (1, 2, ...) asks: the task's, or
        the escalation's once `after_failures` local attempts failed (all of
        them with `tier: external`)."""
        if self.escalate_to is not None and (
            self.tier == "external" or attempt > self.after_failures
        ):
            return self.escalate_to
        return self.model

    def escalated(self, attempt: int) -> bool:
        return self.escalate_to is not None and self.model_for(attempt) == self.escalate_to

    def slot_key(self, attempts: int = 0) -> str:
        """What the task's next attempt (after `attempts` done) waits for a
        free slot of: its model, "shell", "script" (a GPU lease, granted
        by the daemon's leases, not a slot), or "host:<peer>" (run there)."""
        if self.host is not None:
            return f"{HOST_PREFIX}{self.host}"
        if self.kind == "script":
            return "script"
        model = self.model_for(attempts + 1) if self.kind == "llm" else None
        return model or "shell"

    def templates(self) -> list[str]:
        return [self.prompt, self.system or "", *self.command]


@dataclass(frozen=True)
class Plan:
    name: str
    tasks: tuple[Task, ...]
    #: every variable's value, --var over the plan's defaults
    vars: dict[str, str]
    #: the plan file's folder: relative cwd and file: references start there
    base_dir: str
    log_samples: bool = False

    @cached_property
    def _positions(self) -> dict[str, int]:
        return {t.id: i for i, t in enumerate(self.tasks)}

    def task(self, task_id: str) -> Task:
        return self.tasks[self._positions[task_id]]

    def index(self, task_id: str) -> int:
        return self._positions[task_id]

    def dependants(self, task_id: str) -> list[str]:
        """Every task that needs `task_id`, directly or not, in plan order."""
        found: set[str] = set()
        frontier = {task_id}
        while frontier:
            frontier = {
                t.id for t in self.tasks if set(t.depends_on) & frontier and t.id not in found
            }
            found |= frontier
        return [t.id for t in self.tasks if t.id in found]

    def to_json(self) -> dict[str, Any]:
        tasks = [asdict(t) for t in self.tasks]  # tuples become JSON lists
        return {
            "name": self.name,
            "vars": self.vars,
            "base_dir": self.base_dir,
            "log_samples": self.log_samples,
            "tasks": tasks,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        """A plan as `to_json` stored it (already checked when submitted)."""
        tasks = []
        for d in data["tasks"]:
            d = dict(d)
            for key in ("depends_on", "untrusted", "command"):
                d[key] = tuple(d.get(key) or ())
            if isinstance(d.get("gpus"), list):
                d["gpus"] = tuple(d["gpus"])
            tasks.append(Task(**d))
        return cls(
            data["name"],
            tuple(tasks),
            dict(data["vars"]),
            data["base_dir"],
            bool(data.get("log_samples", False)),
        )


def references(text: str) -> list[str]:
    return TEMPLATE.findall(text)


def parse_vars(pairs: list[str]) -> dict[str, str]:
    """--var KEY=VALUE, repeated."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(
                f"--var {pair!r} is not KEY=VALUE.", hint="Write it as --var topic=llamas."
            )
        out[key.strip()] = value
    return out


def parse_plan(
    text: str,
    source: str,
    *,
    known_models: set[str] | None,
    given_vars: dict[str, str] | None = None,
    base_dir: Path | None = None,
    hosts: set[str] | None = None,
) -> Plan:
    """The checked plan, or PlanError naming every problem. `known_models`
    None: the models are not checked here (the daemon checks them against
    what its peers offer too); `hosts`: the peers a task may run on (None:
    not checked here)."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise PlanError(source, [f"not valid JSON: {exc}"]) from None
    try:
        top = _PlanModel.model_validate(raw)
    except ValidationError as exc:
        raise PlanError(source, [_pydantic(exc)]) from None
    base = base_dir or Path(source).parent
    problems: list[str] = []
    tasks: list[Task] = []
    seen: set[str] = set()
    for i, entry in enumerate(top.tasks):
        where = f"tasks[{i}]" + (f" ({entry['id']})" if isinstance(entry.get("id"), str) else "")
        if isinstance(entry.get("command"), str):
            problems.append(
                f"{where}: command must be a list of arguments, not a string (no shell runs "
                f'it): write ["python", "-c", "..."] instead of "python -c ...".'
            )
            continue
        try:
            m = _TaskModel.model_validate(entry)
        except ValidationError as exc:
            problems.append(f"{where}: {_pydantic(exc)}")
            continue
        if not _ID.match(m.id):
            problems.append(f"{where}: id must be letters, digits, '_', '.', '-' (up to 64).")
        if m.id in seen:
            problems.append(f"{where}: duplicate task id '{m.id}'.")
        seen.add(m.id)
        problems += _kind_problems(m, where, known_models)
        problems += _host_problems(m, where, hosts)
        model = m.model or _tags_model(m)
        tasks.append(
            Task(
                id=m.id,
                kind=m.kind,
                depends_on=tuple(m.depends_on),
                priority=m.priority,
                retries=m.retries,
                timeout=m.timeout,
                backoff=m.backoff,
                model=model,
                prompt=m.prompt or "",
                system=m.system,
                max_tokens=m.max_tokens,
                temperature=m.temperature,
                untrusted=tuple(m.untrusted),
                command=tuple(m.command or ()),
                cwd=m.cwd,
                env=dict(m.env),
                gpus=tuple(m.gpus) if isinstance(m.gpus, list) else m.gpus,
                vram_mib=m.vram_mib,
                host=m.host,
                check=m.check.model_dump(exclude_none=True) if m.check else None,
                escalate_to=m.escalate.to if m.escalate else None,
                after_failures=m.escalate.after_failures if m.escalate else 2,
                tier=m.tier,
                sensitive=m.sensitive,
            )
        )
    values = {**top.vars, **(given_vars or {})}
    ids = {t.id for t in tasks}
    for t in tasks:
        for dep in t.depends_on:
            if dep not in ids:
                problems.append(f"{t.id}: depends_on names '{dep}', which is not a task here.")
        problems += _template_problems(t, values, base)
    cycle = find_cycle(tasks)
    if cycle:
        problems.append(
            f"the dependencies form a cycle: {' -> '.join(cycle)} (each depends on the next)."
        )
    if problems:
        raise PlanError(source, problems)
    return Plan(top.name or Path(source).stem, tuple(tasks), values, str(base), top.log_samples)


#: words in a shell task's command that say it runs on a GPU
_GPU_WORDS = re.compile(
    r"(?i)^(?:.*[/\\])?(whisper\S*|faster-whisper|nvidia-smi|rocm-smi|torchrun|"
    r"llama-(?:cli|server|bench)|ffmpeg.*cuda|.*cuda.*|--gpu\S*|-ngl|--device=?(?:cuda|gpu)\S*|"
    r"easyocr|paddleocr|vllm|comfyui|sdxl\S*|stable[-_]diffusion\S*|invokeai)(?:\.exe|\.py)?$"
)


def gpu_hint(command: list[str]) -> str | None:
    """The argument of a command that gives it away as GPU work (pure), if any."""
    for i, arg in enumerate(command):
        if _GPU_WORDS.match(arg):
            return arg
        if (
            arg in ("--device", "-d")
            and i + 1 < len(command)
            and command[i + 1].startswith(("cuda", "gpu"))
        ):
            return f"{arg} {command[i + 1]}"
    return None


def _host_problems(m: _TaskModel, where: str, hosts: set[str] | None) -> list[str]:
    if m.host is None:
        return []
    if m.kind == "llm":
        return [
            f"{where}: an llm task runs wherever its model is (the router picks the machine); "
            "remove host."
        ]
    if hosts is not None and m.host not in hosts:
        listed = ", ".join(sorted(hosts)) or "none has"
        return [
            f"{where}: host '{m.host}' is no peer this daemon can run tasks on ({listed}); "
            f'add {{"name": "{m.host}", "url": ..., "ssh": "ssh://user@host/home"}} to '
            '"peers" in llama-orch.json.'
        ]
    return []


def _kind_problems(m: _TaskModel, where: str, known_models: set[str] | None) -> list[str]:
    if m.kind in ("shell", "script"):
        if not m.command:
            return [f"{where}: a {m.kind} task needs command, a list of arguments."]
        out = []
        if m.kind == "script" and (m.gpus is None or m.gpus in (0, [])):
            out.append(
                f'{where}: a script task needs the GPUs it runs on: "gpus": 1 (any card) or '
                '"gpus": [2] (that one).'
            )
        if m.kind == "shell" and m.gpus:
            out.append(
                f'{where}: a shell task gets no GPU; make it "kind": "script" to lease '
                f"{m.gpus if isinstance(m.gpus, int) else 'those'} card(s)."
            )
        if m.kind == "shell" and m.gpus is None and (hint := gpu_hint(m.command)):
            out.append(
                f"{where}: its command looks like GPU work ({hint!r}), but a shell task gets no "
                'GPU: mark it "kind": "script", "gpus": 1 to run on a leased card, or '
                '"gpus": 0 if it needs none.'
            )
        if m.kind == "shell" and m.vram_mib is not None:
            out.append(f"{where}: vram_mib is for script tasks.")
        return out
    out = []
    if m.gpus is not None or m.vram_mib is not None:
        out.append(
            f"{where}: gpus and vram_mib are for script tasks; an llm task runs on instances."
        )
    if m.command is not None:
        out.append(f"{where}: command is for shell tasks; an llm task has a prompt.")
    if not m.prompt:
        out.append(f"{where}: an llm task needs a prompt.")
    out += _llm_extras(m, where, known_models)
    wanted = m.model or _tags_model(m)
    if bool(m.model) == bool(_tags_model(m)):
        out.append(f"{where}: an llm task names either model (an alias) or tags, one of them.")
        return out
    if known_models is not None and wanted is not None and not offers(known_models, wanted):
        aliases = sorted(x for x in known_models if not x.startswith(TAG_PREFIX))
        tags = sorted(x for x in known_models if x.startswith(TAG_PREFIX) and "," not in x)
        what = "an instance that carries all of" if len(tag_set(wanted)) > 1 else "an instance for"
        out.append(
            f"{where}: no instance serves '{wanted}'"
            + (f" ({what} {', '.join(sorted(tag_set(wanted)))})" if tag_set(wanted) else "")
            + f"; models: {', '.join(aliases) or 'none'}"
            + (f"; tags: {', '.join(t[len(TAG_PREFIX) :] for t in tags)}" if tags else "")
            + "."
        )
    return out


def _llm_extras(m: _TaskModel, where: str, known_models: set[str] | None) -> list[str]:
    """`check`, `escalate` and `tier` of an llm task."""
    out = []
    if m.check is not None:
        if (m.check.regex is None) == (m.check.json_schema is None):
            out.append(f'{where}: check takes one of "regex" or "json_schema".')
        elif m.check.regex is not None:
            try:
                re.compile(m.check.regex)
            except re.error as exc:
                out.append(f"{where}: check.regex is not a valid regular expression ({exc}).")
        else:
            from jsonschema import Draft202012Validator, SchemaError

            try:
                Draft202012Validator.check_schema(m.check.json_schema or {})
            except SchemaError as exc:
                out.append(
                    f"{where}: check.json_schema is not a valid JSON Schema ({exc.message})."
                )
    if m.escalate is not None:
        if known_models is not None and not offers(known_models, m.escalate.to):
            out.append(f"{where}: escalate.to names '{m.escalate.to}', which nothing serves.")
        if m.tier == "local" and m.retries < m.escalate.after_failures:
            out.append(
                f"{where}: escalate.after_failures is {m.escalate.after_failures} but the task "
                f"has only {m.retries} retries, so it never escalates; set retries to at least "
                f"{m.escalate.after_failures}."
            )
    elif m.tier == "external":
        out.append(f'{where}: "tier": "external" needs "escalate": {{"to": "<upstream alias>"}}.')
    return out


def _tags_model(m: _TaskModel) -> str | None:
    """`tags` as the router's name for it (`tags:a,b`), or None when not given."""
    if not m.tags:
        return None
    wanted = [m.tags] if isinstance(m.tags, str) else m.tags
    name = tag_model(t for w in wanted for t in w.split(","))
    return name if name != TAG_PREFIX else None


def _template_problems(t: Task, values: dict[str, str], base: Path) -> list[str]:
    out = []
    for text in t.templates():
        for ref in references(text):
            if ref.startswith("vars."):
                if ref[5:] not in values:
                    out.append(
                        f"{t.id}: {{{{{ref}}}}} has no value; give it with --var {ref[5:]}=VALUE "
                        "or in the plan's vars."
                    )
            elif ref.startswith("file:"):
                if not (base / ref[5:]).is_file():
                    out.append(f"{t.id}: {{{{{ref}}}}}: no such file {base / ref[5:]}.")
            elif ref not in t.depends_on:
                out.append(
                    f"{t.id}: {{{{{ref}}}}} is not one of its dependencies; add '{ref}' to "
                    "depends_on (outputs exist only once a dependency has completed)."
                )
    for ref in t.untrusted:
        if not (ref.startswith("file:") or ref in t.depends_on):
            out.append(f"{t.id}: untrusted names '{ref}', neither a dependency nor file:PATH.")
    return out


def find_cycle(tasks: list[Task]) -> list[str] | None:
    """One dependency cycle as [a, b, ..., a], or None."""
    deps = {t.id: [d for d in t.depends_on] for t in tasks}
    state: dict[str, int] = {}  # 1 = on the path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in deps.get(node, []):
            if dep not in deps:
                continue
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for t in tasks:
        if t.id not in state:
            found = visit(t.id)
            if found:
                return found
    return None


def _pydantic(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)
