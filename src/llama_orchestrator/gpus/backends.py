"""The llama.cpp backends an instance may run on: a leaf, so that the CLI's
help text names them without importing the config models."""

from __future__ import annotations

__all__ = ["BACKENDS"]

BACKENDS: tuple[str, ...] = ("cpu", "cuda", "rocm", "vulkan", "sycl", "metal")
