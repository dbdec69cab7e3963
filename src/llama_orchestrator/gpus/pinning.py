"""Which environment variables pin a process to cards, per backend (pure).

An instance's launch (`config.command`) and a script task's lease
(`gpus.leases`) both pin through these; llama.cpp's backends each read
their own variable.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["PIN_VARS", "pin_env"]

#: The environment variable that limits which GPUs each backend sees.
PIN_VARS = {
    "cuda": "CUDA_VISIBLE_DEVICES",
    "rocm": "HIP_VISIBLE_DEVICES",
    "vulkan": "GGML_VK_VISIBLE_DEVICES",
    "sycl": "ONEAPI_DEVICE_SELECTOR",
}


def pin_env(backend: str, devices: Iterable[int]) -> dict[str, str]:
    """The variables that show a `backend` process only `devices` (none for
    a backend without a variable, or with no devices named). A `cpu` process
    is shown no CUDA card, so that it makes no CUDA context on any."""
    devices = list(devices)
    if backend == "cpu":
        return {"CUDA_VISIBLE_DEVICES": ""}
    var = PIN_VARS.get(backend)
    if var is None or not devices:
        return {}
    ids = ",".join(str(d) for d in devices)
    env = {var: f"level_zero:{ids}" if backend == "sycl" else ids}
    if backend == "cuda":
        # CUDA numbers cards fastest-first by default; nvidia-smi (and the
        # operator) count in PCI bus order. Make the indices mean the same.
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    return env
