"""GPU discovery: NVML, then nvidia-smi, then rocm-smi, then none (issue 8).

Parsers are pure (text in, GpuInfo out) and tested on recorded outputs; the
runners only find and run the tools. On a machine without GPUs nothing is
found on PATH and NVML is absent, so discovery costs a few milliseconds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from llama_orchestrator.errors import OrchError

__all__ = [
    "GpuInfo",
    "GpuQueryError",
    "Discovery",
    "discover",
    "parse_nvidia_smi",
    "parse_rocm_smi",
    "NVIDIA_SMI_QUERY",
    "ROCM_SMI_ARGS",
]

NVIDIA_SMI_QUERY = "index,name,uuid,memory.total,memory.used,memory.free,utilization.gpu,temperature.gpu,power.draw"
ROCM_SMI_ARGS = [
    "--showproductname",
    "--showmeminfo",
    "vram",
    "--showuse",
    "--showtemp",
    "--showpower",
    "--json",
]
TOOL_TIMEOUT = 10


class GpuQueryError(OrchError):
    """A GPU tool answered with something we cannot read."""


@dataclass
class GpuInfo:
    index: int
    name: str
    backend: str  # "cuda" or "rocm"
    memory_total_mib: int
    memory_used_mib: int
    utilization_pct: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    uuid: str | None = None
    instances: list[str] = field(default_factory=list)
    #: where it is in its life (`gpulease.CARD_STATES`), and its script's lease
    state: str | None = None
    lease: dict[str, Any] | None = None

    @property
    def memory_free_mib(self) -> int:
        return max(0, self.memory_total_mib - self.memory_used_mib)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "memory_free_mib": self.memory_free_mib}


@dataclass
class Discovery:
    source: str  # "nvml", "nvidia-smi", "rocm-smi" or "none"
    gpus: list[GpuInfo]
    notes: list[str] = field(default_factory=list)  # why a source was skipped


def _num(text: str) -> float | None:
    text = text.strip()
    if not text or text.startswith("[") or text.upper() in ("N/A", "NAN"):
        return None  # "[N/A]", "[Not Supported]"
    return float(text)


def parse_nvidia_smi(text: str) -> list[GpuInfo]:
    """`nvidia-smi --query-gpu=NVIDIA_SMI_QUERY --format=csv,noheader,nounits`."""
    gpus = []
    for n, line in enumerate(text.strip().splitlines(), 1):
        cols = [c.strip() for c in line.split(",")]
        if len(cols) != 9:
            raise GpuQueryError(
                f"nvidia-smi line {n} has {len(cols)} fields, expected 9: {line[:80]!r}"
            )
        try:
            index, total, used = int(cols[0]), _num(cols[3]), _num(cols[4])
            gpus.append(
                GpuInfo(
                    index=index,
                    name=cols[1],
                    backend="cuda",
                    uuid=cols[2] or None,
                    memory_total_mib=int(total or 0),
                    memory_used_mib=int(used or 0),
                    utilization_pct=_num(cols[6]),
                    temperature_c=_num(cols[7]),
                    power_w=_num(cols[8]),
                )
            )
        except ValueError as exc:
            raise GpuQueryError(
                f"nvidia-smi line {n} is not numbers where expected: {line[:80]!r}"
            ) from exc
    return gpus


def _first(d: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if k in d and d[k] not in ("", "N/A"):
            return d[k]
    return None


def _float_of(d: dict[str, Any], *keys: str) -> float | None:
    v = _first(d, *keys)
    return None if v is None else float(v)


def parse_rocm_smi(text: str) -> list[GpuInfo]:
    """`rocm-smi ROCM_SMI_ARGS`: {"card0": {...}, ...}; key names vary by ROCm version."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GpuQueryError(
            f"rocm-smi did not print JSON ({exc.msg} at line {exc.lineno})"
        ) from exc
    if not isinstance(data, dict):
        raise GpuQueryError("rocm-smi printed JSON that is not an object of cards")
    gpus = []
    for key, card in sorted(data.items()):
        if not key.startswith("card") or not isinstance(card, dict):
            continue  # e.g. "system"
        try:
            index = int(key[4:])
            total = _first(card, "VRAM Total Memory (B)")
            used = _first(card, "VRAM Total Used Memory (B)")
            gpus.append(
                GpuInfo(
                    index=index,
                    name=str(
                        _first(card, "Card Series", "Card series", "Card model", "Card SKU") or key
                    ),
                    backend="rocm",
                    memory_total_mib=int(int(total or 0) / (1024 * 1024)),
                    memory_used_mib=int(int(used or 0) / (1024 * 1024)),
                    utilization_pct=_float_of(card, "GPU use (%)"),
                    temperature_c=_float_of(
                        card, "Temperature (Sensor edge) (C)", "Temperature (Sensor junction) (C)"
                    ),
                    power_w=_float_of(
                        card,
                        "Average Graphics Package Power (W)",
                        "Current Socket Graphics Package Power (W)",
                    ),
                    uuid=_first(card, "Unique ID"),
                )
            )
        except (TypeError, ValueError) as exc:
            raise GpuQueryError(
                f"rocm-smi reported {key} with values that are not numbers"
            ) from exc
    return gpus


def _optional(fn: Callable[..., Any], *args: Any) -> Any:
    """An NVML reading that some cards do not support: None then."""
    try:
        return fn(*args)
    except Exception:
        return None


def _from_nvml() -> list[GpuInfo] | None:
    """NVML through nvidia-ml-py (the `nvidia` extra); None when unavailable."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver: fall back to the tools
        return None
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            name = pynvml.nvmlDeviceGetName(h)
            util = _optional(pynvml.nvmlDeviceGetUtilizationRates, h)
            temp = _optional(pynvml.nvmlDeviceGetTemperature, h, 0)  # 0 = NVML_TEMPERATURE_GPU
            power_mw = _optional(pynvml.nvmlDeviceGetPowerUsage, h)
            gpus.append(
                GpuInfo(
                    index=i,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    backend="cuda",
                    memory_total_mib=int(mem.total // (1024 * 1024)),
                    memory_used_mib=int(mem.used // (1024 * 1024)),
                    utilization_pct=None if util is None else float(util.gpu),
                    temperature_c=None if temp is None else float(temp),
                    power_w=None if power_mw is None else power_mw / 1000.0,
                )
            )
        return gpus
    finally:
        pynvml.nvmlShutdown()


def _run(tool: str, args: list[str]) -> str | None:
    exe = shutil.which(tool)
    if exe is None:
        return None
    try:
        r = subprocess.run([exe, *args], capture_output=True, text=True, timeout=TOOL_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise GpuQueryError(f"{tool} did not answer within {TOOL_TIMEOUT}s") from exc
    except OSError as exc:
        raise GpuQueryError(f"{tool} could not be run: {exc.strerror}") from exc
    if r.returncode != 0:
        detail = (r.stderr or r.stdout).strip().splitlines()
        raise GpuQueryError(f"{tool} failed (exit {r.returncode}): {detail[-1] if detail else ''}")
    return r.stdout


def discover() -> Discovery:
    """Every GPU the first working source reports. A source that exists but
    answers garbage is skipped with a note (and the next one tried), never a crash."""
    notes: list[str] = []
    nvml = _from_nvml()
    if nvml:
        return Discovery("nvml", nvml)
    sources: list[tuple[str, list[str], Callable[[str], list[GpuInfo]]]] = [
        (
            "nvidia-smi",
            [f"--query-gpu={NVIDIA_SMI_QUERY}", "--format=csv,noheader,nounits"],
            parse_nvidia_smi,
        ),
        ("rocm-smi", ROCM_SMI_ARGS, parse_rocm_smi),
    ]
    for tool, args, parse in sources:
        try:
            out = _run(tool, args)
            if out is None:
                continue
            gpus = parse(out)
        except GpuQueryError as exc:
            notes.append(str(exc))
            continue
        if gpus:
            return Discovery(tool, gpus, notes)
    return Discovery("none", [], notes)
