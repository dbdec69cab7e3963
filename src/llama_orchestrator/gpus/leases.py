"""GPU leases for plans' script tasks, the decisions (pure): which cards a
script task gets (`choose`), where a card is in its life (`card_state`:
idle, booting_llm, llm_ready, llm_busy, booting_script, script_busy), and
what the script's process sees (`lease_env`). The daemon carries them out
(`daemon.leases`); `gpus` and the dashboard show them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from llama_orchestrator.errors import UserError
from llama_orchestrator.gpus.pinning import PIN_VARS
from llama_orchestrator.states import RUNNING_STATES
from llama_orchestrator.states import InstanceState as S
from llama_orchestrator.store.rows import InstanceRow, Lease

__all__ = [
    "Occupant",
    "Card",
    "Choice",
    "choose",
    "never",
    "card_state",
    "occupants",
    "lease_env",
    "refuse_leased",
    "CARD_STATES",
]

CARD_STATES = ("idle", "booting_llm", "llm_ready", "llm_busy", "booting_script", "script_busy")
#: instance states that hold a card: running, loading, waiting to load or to restart
_HOLDING = RUNNING_STATES | {S.QUEUED, S.BACKOFF}


@dataclass(frozen=True)
class Occupant:
    """An instance on a card, as the decision needs it."""

    name: str
    state: S
    may_yield: bool  # its config says yield_to_scripts
    busy: bool  # requests in flight


@dataclass(frozen=True)
class Card:
    index: int
    total_mib: int
    free_mib: int
    occupants: tuple[Occupant, ...] = ()
    leased: bool = False


@dataclass(frozen=True)
class Choice:
    cards: tuple[int, ...]
    #: the instances to stop first
    yielded: tuple[str, ...] = ()


def never(want: int | tuple[int, ...], indices: Iterable[int]) -> str | None:
    """Why a script task can never get its cards on a machine with these
    (pure): none at all, one it names is not there, or more than there are.
    Waiting would not help: it is refused at `plan run`, failed if it runs."""
    have = set(indices)
    if not have:
        return "no GPU was found on this machine"
    if isinstance(want, tuple):
        missing = [i for i in want if i not in have]
        if missing:
            listed = ", ".join(map(str, sorted(have)))
            return (
                f"GPU {', '.join(map(str, missing))} is not on this machine (it has GPU {listed})"
            )
    elif want > len(have):
        return f"it needs {want} GPUs and this machine has {len(have)}"
    return None


def choose(want: int | tuple[int, ...], vram_mib: int | None, cards: list[Card]) -> Choice | str:
    """The cards for a script task (pure): `want` of them, or those named;
    free ones first, then ones whose every instance may yield and is idle.
    Else why it must wait (see `never` for what waiting cannot mend)."""
    if why := never(want, (c.index for c in cards)):
        return why
    by_index = {c.index: c for c in cards}
    if isinstance(want, tuple):
        picked = [by_index[i] for i in want]
    else:
        picked = sorted(cards, key=lambda c: (c.leased, _cost(c, vram_mib), c.index))[:want]
    reasons = [r for c in picked if (r := _why_not(c, vram_mib))]
    if reasons:
        return "; ".join(reasons)
    return Choice(
        tuple(c.index for c in picked), tuple(sorted({o.name for c in picked for o in c.occupants}))
    )


def _cost(c: Card, vram_mib: int | None) -> int:
    """0: free now; 1: free once its instances yield; 2: not to be had now."""
    if _why_not(c, vram_mib):
        return 2
    return 1 if c.occupants else 0


def _why_not(c: Card, vram_mib: int | None) -> str | None:
    if c.leased:
        return f"GPU {c.index} is leased to another script task"
    for o in c.occupants:
        if not o.may_yield:
            return (
                f"GPU {c.index} is held by instance '{o.name}' ({o.state}), which does not "
                'yield to scripts (set "yield_to_scripts": true in its config to let it)'
            )
        if o.busy or o.state in (S.STARTING, S.QUEUED, S.STOPPING):
            return f"GPU {c.index} is held by instance '{o.name}', busy ({o.state}); it yields when idle"
    room = c.total_mib if c.occupants else c.free_mib
    if vram_mib is not None and room and room < vram_mib:
        return f"GPU {c.index} has {room} MiB free, the task needs {vram_mib} MiB"
    return None


def card_state(lease: Lease | None, occupants: Iterable[Occupant]) -> str:
    """Where a card is in its life (pure; see CARD_STATES)."""
    if lease is not None:
        return "booting_script" if lease.state == "yielding" else "script_busy"
    states = [o for o in occupants if o.state in _HOLDING]
    if any(o.state in (S.STARTING, S.QUEUED, S.BACKOFF) for o in states):
        return "booting_llm"
    healthy = [o for o in states if o.state == S.HEALTHY]
    if any(o.busy for o in healthy):
        return "llm_busy"
    return "llm_ready" if healthy else "idle"


def occupants(
    rows: Iterable[InstanceRow],
    devices_of: Callable[[str], list[int]],
    may_yield: Callable[[str], bool],
    busy: Callable[[str], bool],
) -> dict[int, list[Occupant]]:
    """The instances holding each card (pure over what it is handed): by the
    cards a run got, else those its config pins."""
    out: dict[int, list[Occupant]] = {}
    for row in rows:
        if row.state not in _HOLDING:
            continue
        for gpu in row.gpu_devices or devices_of(row.name):
            out.setdefault(gpu, []).append(
                Occupant(row.name, row.state, may_yield(row.name), busy(row.name))
            )
    return out


def refuse_leased(leases: Iterable[Lease], name: str, devices: list[int]) -> None:
    """Nothing else starts on a leased card: UserError naming the lease."""
    for lease in leases:
        if lease.gpu in devices:
            raise UserError(
                f"GPU {lease.gpu} is leased to script task '{lease.task_id}' of plan run "
                f"{lease.run_id}, so instance '{name}' cannot start on it now.",
                hint="It can once the task ends; `llama-orch gpus` shows the leases.",
            )


def lease_env(cards: Iterable[int]) -> dict[str, str]:
    """What a script's process gets: those cards only, whatever its runtime."""
    value = ",".join(str(c) for c in cards)
    return {
        **{var: value for var in sorted(set(PIN_VARS.values()))},
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",  # indices as nvidia-smi shows them
    }
