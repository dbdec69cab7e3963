"""What a llama-server build can drive: its GPU backends, read from the build.

A CPU-only llama-server given `gpu.backend: cuda` runs, healthy, on the CPU
without a word, so the backend is checked against the binary before anything
starts. Two sources, both the build's own:

- `llama-server --list-devices` prints the non-CPU devices it sees, each named
  by its backend (`CUDA0`, `ROCm0`, `Vulkan0`, `SYCL0`, `MTL0`), and its
  backends log as they load (`load_backend: loaded CUDA backend from …`,
  `ggml_cuda_init: …`);
- the ggml libraries beside the binary (`libggml-cuda.so`, `ggml-vulkan.dll`):
  a build whose backend sees no device here lists `(none)` all the same (a
  Vulkan build on Mesa's lavapipe, a CUDA build without the driver).

Reading the output is pure; `probe` runs the binary once per version of it
(path, size and mtime), remembered in a JSON file beside the home's state.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from llama_orchestrator.files import atomic_write_text
from llama_orchestrator.gpus.pinning import PIN_VARS

__all__ = ["Build", "from_listing", "from_files", "probe", "LABELS"]

#: How llama.cpp names each backend (device names, library names, log lines)
#: -> our `gpu.backend`. HIP builds call their devices ROCm.
_GGML_NAMES = {
    "cuda": "cuda",
    "rocm": "rocm",
    "hip": "rocm",
    "vulkan": "vulkan",
    "vk": "vulkan",
    "sycl": "sycl",
    "metal": "metal",
    "mtl": "metal",
}

#: How people write each backend in a sentence.
LABELS = {"cuda": "CUDA", "rocm": "ROCm", "vulkan": "Vulkan", "sycl": "SYCL", "metal": "Metal"}

_DEVICE = re.compile(r"^\s+([A-Za-z]+)\d*:\s", re.MULTILINE)
_LOADED = re.compile(r"loaded (\w+) backend from", re.IGNORECASE)
_INIT = re.compile(r"\bggml_(cuda|vulkan|sycl|metal)_init\b|\bggml_(vulkan|metal|sycl):")
_LIBRARY = re.compile(r"^(?:lib)?ggml-(cuda|hip|vulkan|sycl|metal)\b.*\.(?:so|dll|dylib)(?:\.|$)")
_ROCM_INIT = re.compile(r"ggml_cuda_init: found \d+ ROCm devices|failed to initialize ROCm")


@dataclass(frozen=True)
class Build:
    """One llama-server binary's GPU backends. `known` is False when the
    binary did not answer `--list-devices` as llama-server does (an old
    build, a wrapper script): then nothing is refused on its account."""

    binary: str
    backends: frozenset[str]
    known: bool
    devices: tuple[str, ...] = ()

    def lacks(self, backend: str) -> bool:
        return self.known and backend in LABELS and backend not in self.backends

    def label(self) -> str:
        """`cuda, vulkan`, `cpu only`, or why it is not known."""
        if self.backends:
            return ", ".join(sorted(self.backends))
        return "cpu only" if self.known else "unknown (it does not answer --list-devices)"

    def to_json(self) -> dict[str, object]:
        return {
            "binary": self.binary,
            "backends": sorted(self.backends),
            "known": self.known,
            "devices": list(self.devices),
        }


def from_listing(stdout: str, stderr: str) -> tuple[frozenset[str], tuple[str, ...]] | None:
    """The backends and device lines in `--list-devices` output, or None when
    it is not llama-server's (no `Available devices:` line)."""
    head, sep, listing = stdout.partition("Available devices:")
    if not sep:
        return None
    found = {_GGML_NAMES.get(m.lower()) for m in _DEVICE.findall(listing)}
    found |= {_GGML_NAMES.get(m.lower()) for m in _LOADED.findall(stderr + head)}
    for m in _INIT.finditer(stderr + head):
        found.add(_GGML_NAMES.get((m.group(1) or m.group(2)).lower()))
    if "cuda" in found and _ROCM_INIT.search(stderr + head):
        found.discard("cuda")  # a HIP build logs through ggml_cuda_init
        found.add("rocm")
    devices = tuple(
        line.strip() for line in listing.splitlines() if line.strip() and line.strip() != "(none)"
    )
    return frozenset(b for b in found if b), devices


def from_files(names: Iterable[str]) -> frozenset[str]:
    """The backends whose ggml library is among these file names (a binary's folder)."""
    found = set()
    for name in names:
        if m := _LIBRARY.match(name.lower()):
            found.add(_GGML_NAMES[m.group(1)])
    return frozenset(found)


#: in-process memory of probes, by (path, size, mtime)
_SEEN: dict[tuple[str, int, int], Build] = {}


def probe(binary: Path, cache: Path | None = None, timeout: float = 15.0) -> Build:
    """The backends of `binary`: remembered, or read from it now (and written
    to `cache`, a JSON file, for the next process)."""
    try:
        st = binary.stat()
    except OSError:
        return Build(str(binary), frozenset(), known=False)
    key = (str(binary), st.st_size, st.st_mtime_ns)
    if key in _SEEN:
        return _SEEN[key]
    stored = _read_cache(cache)
    entry = stored.get(key[0])
    if isinstance(entry, dict) and [entry.get("size"), entry.get("mtime_ns")] == list(key[1:]):
        build = Build(
            key[0],
            frozenset(entry.get("backends", ())),
            bool(entry.get("known")),
            tuple(entry.get("devices", ())),
        )
    else:
        build = _run(binary, timeout)
        if cache is not None:
            stored[key[0]] = {**build.to_json(), "size": key[1], "mtime_ns": key[2]}
            with contextlib.suppress(OSError):  # a read-only home: probe again next time
                atomic_write_text(cache, json.dumps(stored, indent=1) + "\n")
    _SEEN[key] = build
    return build


def _read_cache(cache: Path | None) -> dict[str, object]:
    if cache is None:
        return {}
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _run(binary: Path, timeout: float) -> Build:
    beside = from_files(_names_in(binary.parent))
    try:
        done = subprocess.run(
            [str(binary), "--list-devices"],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            env=_unpinned(os.environ),
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError):
        return Build(str(binary), beside, known=False)
    read = from_listing(done.stdout, done.stderr)
    if read is None:
        return Build(str(binary), beside, known=False)
    backends, devices = read
    return Build(str(binary), backends | beside, known=True, devices=devices)


def _names_in(folder: Path) -> list[str]:
    try:
        return [p.name for p in folder.iterdir()]
    except OSError:
        return []


def _unpinned(env: Mapping[str, str]) -> dict[str, str]:
    """The environment without the variables that hide cards from a backend:
    a daemon started with CUDA_VISIBLE_DEVICES="" must still see a CUDA build."""
    pins = set(PIN_VARS.values()) | {"ROCR_VISIBLE_DEVICES"}
    return {k: v for k, v in env.items() if k not in pins}
