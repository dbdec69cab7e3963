"""VRAM fit: what each instance needs per device, whether a device holds
everything pinned to it, and which device(s) `--gpu auto` should take (pure)."""

from __future__ import annotations

from dataclasses import dataclass

from llama_orchestrator.config.instance import InstanceConfig
from llama_orchestrator.errors import UserError
from llama_orchestrator.gpus.discover import GpuInfo, card_index
from llama_orchestrator.models.gguf import COMPUTE_OVERHEAD_BYTES, MIB, ModelInfo, estimate
from llama_orchestrator.units import human_bytes, human_count

__all__ = [
    "GPU_BACKENDS",
    "human_count",
    "demand",
    "on_cards",
    "Overcommit",
    "overcommits",
    "pick_devices",
    "human_bytes",
]

GPU_BACKENDS = frozenset({"cuda", "rocm", "vulkan", "sycl", "metal"})


def demand(cfg: InstanceConfig, info: ModelInfo | None) -> dict[int, int]:
    """Bytes this instance needs on each pinned device ({} when it pins none):
    `gpu.vram_mib` when the operator set it, else the estimate from `info`
    (None: the model is not read, so only the override counts)."""
    g = cfg.gpu
    if g.backend not in GPU_BACKENDS or not g.devices:
        return {}
    if g.vram_mib is not None:  # the operator measured it
        return {d: g.vram_mib * MIB for d in g.devices}
    if info is None:
        return {}
    est = estimate(info, cfg.model.context_size, cfg.server.parallel, g.layers)
    return est.per_device(g.devices, g.tensor_split)


def on_cards(per_device: dict[int, int], backend: str, gpus: list[GpuInfo]) -> dict[int, int]:
    """A demand keyed by the cards' own indices (`gpus` rows) rather than
    `backend`'s: a Vulkan and a CUDA instance on one card add up. Devices no
    row stands for are left out (reported as absent elsewhere)."""
    out: dict[int, int] = {}
    for device, need in per_device.items():
        card = card_index(gpus, backend, device)
        if card is not None:
            out[card] = out.get(card, 0) + need
    return out


@dataclass(frozen=True)
class Overcommit:
    device: int
    name: str
    total_bytes: int
    needed_bytes: int
    instances: tuple[tuple[str, int], ...]  # (name, bytes) in the order given

    def message(self) -> str:
        who = " + ".join(f"{n} ({human_bytes(b)})" for n, b in self.instances)
        return (
            f"GPU {self.device} ({self.name}, {human_bytes(self.total_bytes)}) cannot hold {who} = "
            f"{human_bytes(self.needed_bytes)}; lower gpu.layers or model.context_size, or pin one "
            "instance to another GPU"
        )


def overcommits(demands: dict[str, dict[int, int]], gpus: list[GpuInfo]) -> list[Overcommit]:
    """Cards whose pinned instances need more than their total VRAM
    (`demands` keyed by the cards' indices: `on_cards`)."""
    by_index = {g.index: g for g in gpus}
    out = []
    devices = sorted({d for per in demands.values() for d in per})
    for dev in devices:
        gpu = by_index.get(dev)
        if gpu is None:
            continue  # a missing card is reported by gpus.alerts, not as a fit problem
        users = tuple((name, per[dev]) for name, per in demands.items() if dev in per)
        needed = sum(b for _, b in users)
        total = gpu.memory_total_mib * MIB
        if needed > total:
            out.append(Overcommit(dev, gpu.name, total, needed, users))
    return out


def pick_devices(
    info: ModelInfo, ctx: int, parallel: int, layers: int | None, gpus: list[GpuInfo]
) -> list[int]:
    """The fewest devices, most free VRAM first, whose free memory holds the
    model; UserError when even all of them together do not."""
    if not gpus:
        raise UserError("--gpu auto found no GPU.", hint="Pass --gpu N or use --backend cpu.")
    est = estimate(info, ctx, parallel, layers)
    variable = est.weights_gpu_bytes + est.kv_gpu_bytes
    ranked = sorted(gpus, key=lambda g: (-g.memory_free_mib, g.index))
    chosen: list[GpuInfo] = []
    for g in ranked:
        chosen.append(g)
        free = sum(c.memory_free_mib * MIB - COMPUTE_OVERHEAD_BYTES for c in chosen)
        if free >= variable:
            return sorted(c.index for c in chosen)
    total_free = sum(g.memory_free_mib for g in gpus) * MIB
    raise UserError(
        f"The model needs about {human_bytes(est.gpu_bytes)} of VRAM and all GPUs together have "
        f"{human_bytes(total_free)} free.",
        hint="Offload fewer layers (--layers), use a smaller --ctx, or a smaller quantisation.",
    )
