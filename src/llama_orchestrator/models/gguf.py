"""GGUF model metadata and a memory estimate (`models inspect`, `init`, VRAM fit).

The header is walked directly: gguf's GGUFReader decodes every array into
Python objects and took 11.6 s on a 250 MB model here (its 262k-token
vocabulary); skipping arrays makes the same read take milliseconds. The gguf
package still supplies the names and block sizes of file and tensor types.
"""

from __future__ import annotations

import functools
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from llama_orchestrator.errors import UserError
from llama_orchestrator.units import MIB

__all__ = [
    "GGUF_MAGIC",
    "is_gguf",
    "ModelError",
    "ModelInfo",
    "Estimate",
    "read_model",
    "split_of",
    "split_parts",
    "estimate",
    "MIB",
    "COMPUTE_OVERHEAD_BYTES",
]

GGUF_MAGIC = b"GGUF"
#: Per device in use: CUDA/Vulkan context plus compute buffers. A round, documented guess.
COMPUTE_OVERHEAD_BYTES = 256 * MIB
KV_BYTES_PER_ELEMENT = 2  # llama-server's default cache type is f16

# value types of the GGUF spec
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


class ModelError(UserError):
    pass


#: llama.cpp's split files: `name-00001-of-00003.gguf` (llama-gguf-split names them so,
#: and llama-server given the first part loads the rest from beside it)
_SPLIT_RE = re.compile(r"^(?P<base>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$", re.IGNORECASE)


def split_of(name: str) -> tuple[str, int, int] | None:
    """(base, part, count) of a split file's name, or None for a whole model."""
    m = _SPLIT_RE.match(name)
    if m is None or not 1 <= int(m["i"]) <= int(m["n"]):
        return None
    return m["base"], int(m["i"]), int(m["n"])


def split_parts(path: Path) -> list[Path]:
    """Every file of the model that starts at `path`: itself alone, or all the
    parts of a split model when `path` is its first part."""
    split = split_of(path.name)
    if split is None or split[1] != 1:
        return [path]
    base, _, count = split
    return [path.with_name(f"{base}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def is_gguf(path: Path) -> bool:
    """True when the file starts with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def n_bytes(self) -> int:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(self.ggml_type)]
        return self.n_elements // block * size


@dataclass(frozen=True)
class ModelInfo:
    """What `models inspect` shows (DESIGN §8 keys) plus what the estimate needs."""

    path: str
    architecture: str
    name: str | None
    parameters: int
    file_type: str
    context_length: int | None
    layers: int
    embedding_length: int | None
    head_count: int | None
    head_count_kv: int | None
    key_length: int | None
    value_length: int | None
    size_bytes: int
    tensors: tuple[TensorInfo, ...] = field(repr=False, default=())
    #: tokenizer.chat_template is set: without one (a base model) llama-server
    #: formats chat in a template the model never saw, and the answer is noise
    chat_template: bool = False

    def to_json(self) -> dict[str, Any]:
        keys = (
            "path",
            "architecture",
            "name",
            "parameters",
            "file_type",
            "context_length",
            "layers",
            "embedding_length",
            "head_count",
            "head_count_kv",
            "size_bytes",
        )
        return {k: getattr(self, k) for k in keys}


class _Header:
    """Sequential reads from the GGUF header with clear errors on truncation."""

    def __init__(self, f: BinaryIO, path: Path) -> None:
        self.f, self.path = f, path

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise ModelError(
                f"{self.path} is truncated: its GGUF header ends early.",
                hint="Download or copy the file again.",
            )
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > 1 << 24:
            raise ModelError(f"{self.path} is not a valid GGUF file (a {n}-byte string).")
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int, keep_arrays: bool) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item, count = self.unpack("<I"), self.unpack("<Q")
            if not keep_arrays or count > 4096:  # vocabularies: skip, never decode
                self._skip_array(item, count)
                return None
            return [self.value(item, False) for _ in range(count)]
        raise ModelError(f"{self.path} is not a valid GGUF file (value type {vtype}).")

    def _skip_array(self, item: int, count: int) -> None:
        if item in _SCALARS:
            self.f.seek(struct.calcsize(_SCALARS[item]) * count, 1)
        elif item == _STRING:
            for _ in range(count):
                self.f.seek(self.unpack("<Q"), 1)
        else:
            for _ in range(count):
                self.value(item, False)


def read_model(path: Path) -> ModelInfo:
    """Read a GGUF file's metadata; ModelError (exit 2) when it is not one. For
    the first part of a split model the figures cover every part (a missing
    part is an error: llama-server would refuse to load it).

    Each version of a file is read once per process: an `up` asks for a
    model's header in its checks, its card choice and its VRAM fit, and the
    daemon at every start. What was read is kept by the path, size and
    modification time of every part, so a file that changed is read again."""
    try:
        key = tuple(_version(p) for p in split_parts(path))
    except OSError:  # missing or unreadable: the read says which, and why
        return _read_model(path)
    return _read_once(key)


def _version(part: Path) -> tuple[str, int, int]:
    st = part.stat()
    return str(part), st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=64)
def _read_once(key: tuple[tuple[str, int, int], ...]) -> ModelInfo:
    return _read_model(Path(key[0][0]))


def _read_model(path: Path) -> ModelInfo:
    kv, tensors = _read_header(path)
    size = path.stat().st_size
    parts = split_parts(path)
    for part in parts[1:]:
        if not part.is_file():
            raise ModelError(
                f"{path} is part 1 of a split model but part {part.name} is missing.",
                hint="Put every part in the same folder (a pull fetches them all).",
            )
        tensors += _read_header(part)[1]
        size += part.stat().st_size
    arch = kv.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelError(
            f"{path} has no general.architecture; it is not a model llama.cpp can load."
        )

    def arch_int(key: str) -> int | None:
        v = kv.get(f"{arch}.{key}")
        if isinstance(v, list):  # per-layer values (e.g. head_count_kv): the largest bounds memory
            v = max(v) if v else None
        return int(v) if isinstance(v, (int, float)) else None

    return ModelInfo(
        path=str(path),
        architecture=arch,
        name=kv.get("general.name"),
        parameters=sum(t.n_elements for t in tensors),
        file_type=_file_type(kv.get("general.file_type")),
        context_length=arch_int("context_length"),
        layers=arch_int("block_count") or 0,
        embedding_length=arch_int("embedding_length"),
        head_count=arch_int("attention.head_count"),
        head_count_kv=arch_int("attention.head_count_kv"),
        key_length=arch_int("attention.key_length"),
        value_length=arch_int("attention.value_length"),
        size_bytes=size,
        tensors=tuple(tensors),
        chat_template=isinstance(kv.get("tokenizer.chat_template"), str),
    )


def _read_header(path: Path) -> tuple[dict[str, Any], list[TensorInfo]]:
    """The key-value pairs and tensor list of one GGUF file."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise ModelError(
            f"{path} cannot be read: {exc.strerror}.", hint="Check the path."
        ) from None
    with f:
        h = _Header(f, path)
        if f.read(4) != GGUF_MAGIC:
            raise ModelError(
                f"{path} is not a GGUF model (its first bytes are not 'GGUF').",
                hint="Point at a .gguf file.",
            )
        version = h.unpack("<I")
        count_fmt = "<I" if version == 1 else "<Q"
        n_tensors, n_kv = h.unpack(count_fmt), h.unpack(count_fmt)
        kv: dict[str, Any] = {}
        for _ in range(n_kv):
            key = h.string()
            kv[key] = h.value(h.unpack("<I"), keep_arrays=True)
        tensors = []
        last: tuple[int, TensorInfo] | None = None  # the tensor whose data ends the file
        for _ in range(n_tensors):
            name = h.string()
            dims = tuple(h.unpack("<Q") for _ in range(h.unpack("<I")))
            ggml_type = h.unpack("<I")
            offset = h.unpack("<Q")
            tensors.append(TensorInfo(name, dims, ggml_type))
            if last is None or offset >= last[0]:
                last = (offset, tensors[-1])
        if last is not None:
            align = kv.get("general.alignment", 32)
            align = align if isinstance(align, int) and align > 0 else 32
            data_start = -(-f.tell() // align) * align
            need = data_start + last[0] + last[1].n_bytes
            size = path.stat().st_size
            if size < need:
                raise ModelError(
                    f"{path} is truncated: it has {size:,} bytes and its tensors need {need:,} "
                    "(an interrupted download or copy?).",
                    hint="Copy or download it again.",
                )
    return kv, tensors


def _file_type(code: Any) -> str:
    if not isinstance(code, int):
        return "unknown"
    from gguf import LlamaFileType

    try:
        return LlamaFileType(code).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"type {code}"


@dataclass(frozen=True)
class Estimate:
    """Memory an instance needs: on the GPU(s) in total, and on the host."""

    context: int
    context_per_slot: int
    layers_on_gpu: int
    weights_gpu_bytes: int
    weights_host_bytes: int
    kv_gpu_bytes: int
    kv_host_bytes: int
    overhead_bytes: int

    @property
    def gpu_bytes(self) -> int:
        return self.weights_gpu_bytes + self.kv_gpu_bytes + self.overhead_bytes

    @property
    def host_bytes(self) -> int:
        return self.weights_host_bytes + self.kv_host_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "context": self.context,
            "context_per_slot": self.context_per_slot,
            "layers_on_gpu": self.layers_on_gpu,
            "gpu_bytes": self.gpu_bytes,
            "weights_gpu_bytes": self.weights_gpu_bytes,
            "kv_gpu_bytes": self.kv_gpu_bytes,
            "overhead_bytes": self.overhead_bytes,
            "host_bytes": self.host_bytes,
        }

    def per_device(
        self, devices: list[int], tensor_split: list[float] | None = None
    ) -> dict[int, int]:
        """Split the GPU share over `devices` evenly or by `tensor_split`; each device
        pays its own overhead."""
        if not devices or self.layers_on_gpu == 0:
            return {}
        shares = (
            tensor_split
            if tensor_split and len(tensor_split) == len(devices)
            else [1.0] * len(devices)
        )
        total = sum(shares) or 1.0
        variable = self.weights_gpu_bytes + self.kv_gpu_bytes
        return {
            d: int(variable * s / total) + COMPUTE_OVERHEAD_BYTES
            for d, s in zip(devices, shares, strict=True)
        }


def estimate(
    info: ModelInfo, ctx: int, parallel: int = 1, layers: int | None = None, gpu: bool = True
) -> Estimate:
    """Weights share plus KV cache (f16) for `ctx` tokens with `layers` offloaded.

    llama-server's -c is the total context, divided among the -np slots, so the
    KV cache depends on ctx, not on parallel. `layers` None or < 0 means all;
    the output layer goes to the GPU only when every block does (as -ngl does)."""
    n = info.layers
    context = ctx if ctx > 0 else (info.context_length or 4096)
    on_gpu = 0 if not gpu else (n + 1 if layers is None or layers < 0 else min(layers, n + 1))
    blocks_on_gpu = min(on_gpu, n)
    block_bytes = [0] * n
    output_bytes = 0
    other_bytes = 0
    has_output = any(t.name == "output.weight" for t in info.tensors)
    for t in info.tensors:
        if t.name.startswith("blk."):
            i = int(t.name.split(".")[1])
            if i < n:
                block_bytes[i] += t.n_bytes
                continue
        if t.name.startswith("output") or (t.name == "token_embd.weight" and not has_output):
            output_bytes += t.n_bytes
        else:
            other_bytes += t.n_bytes
    # llama.cpp offloads the last `blocks_on_gpu` blocks
    weights_gpu = sum(block_bytes[n - blocks_on_gpu :]) + (output_bytes if on_gpu > n else 0)
    weights_total = sum(block_bytes) + output_bytes + other_bytes
    heads_kv = info.head_count_kv or info.head_count or 1
    head_dim = (info.embedding_length or 0) // (info.head_count or 1)
    per_layer = (
        context * heads_kv * ((info.key_length or head_dim) + (info.value_length or head_dim))
    )
    kv_layer_bytes = per_layer * KV_BYTES_PER_ELEMENT
    return Estimate(
        context=context,
        context_per_slot=context // max(1, parallel),
        layers_on_gpu=on_gpu,
        weights_gpu_bytes=weights_gpu,
        weights_host_bytes=weights_total - weights_gpu,
        kv_gpu_bytes=kv_layer_bytes * blocks_on_gpu,
        kv_host_bytes=kv_layer_bytes * (n - blocks_on_gpu),
        overhead_bytes=COMPUTE_OVERHEAD_BYTES if on_gpu else 0,
    )
