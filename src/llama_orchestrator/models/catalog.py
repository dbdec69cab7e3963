"""The model catalog: which GGUF models were pulled from Hugging Face, where
they lie and whether their checksums were verified.

Pure decisions (parsing a model reference, choosing the file(s) of a repo for a
quant tag) plus the catalog file itself, `<home>/state/models.json`, written
atomically. The network side is `llama_orchestrator.models.hub`.

A reference names a repo and, optionally, what in it:

    Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M     a quant tag
    Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q8_0.gguf   a file
    hf://Qwen/Qwen2.5-0.5B-Instruct-GGUF       the repo's only model (or its Q4_K_M)

In an instance config only the `hf://` form is a reference (anything else is a
path), so `"model": {"path": "hf://org/repo:Q4_K_M"}` starts on the pulled file.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llama_orchestrator.errors import UserError
from llama_orchestrator.files import atomic_write_text
from llama_orchestrator.models.gguf import split_of

__all__ = [
    "model_file",
    "REF_PREFIX",
    "DEFAULT_QUANT",
    "Ref",
    "RemoteFile",
    "Choice",
    "Entry",
    "Catalog",
    "parse_ref",
    "is_ref",
    "quant_of",
    "choose",
    "models_of",
    "entry_id",
    "catalog_path",
    "resolve_local",
]

REF_PREFIX = "hf://"
#: what llama-server's own `-hf repo` picks when no quant is named
DEFAULT_QUANT = "Q4_K_M"

_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REF_RE = re.compile(
    rf"^(?P<repo>{_SEGMENT}/{_SEGMENT})(?::(?P<quant>[A-Za-z0-9_.-]+)|/(?P<file>.+))?$"
)
#: quant tags as llama.cpp's quantize and the usual GGUF uploaders write them
_QUANT_RE = re.compile(
    r"(?:^|[-._])(?P<q>(?:UD-)?(?:I?Q[1-8](?:_[A-Z0-9]+)+|F16|F32|BF16|MXFP4(?:_MOE)?|TQ[12]_0))(?=[-._]|$)",
    re.IGNORECASE,
)


def is_ref(text: str) -> bool:
    """True for an `hf://` reference (the only form an instance config reads as one)."""
    return text.startswith(REF_PREFIX)


@dataclass(frozen=True)
class Ref:
    """A parsed model reference."""

    repo: str
    quant: str | None = None
    file: str | None = None

    def __str__(self) -> str:
        if self.file:
            return f"{self.repo}/{self.file}"
        return f"{self.repo}:{self.quant}" if self.quant else self.repo


def parse_ref(text: str) -> Ref:
    """`[hf://]OWNER/REPO[:QUANT|/FILE.gguf]`; UserError naming the form otherwise."""
    raw = text.strip()
    for prefix in (REF_PREFIX, "https://huggingface.co/", "huggingface.co/", "hf.co/"):
        if raw.startswith(prefix):
            raw = raw[len(prefix) :]
            break
    m = _REF_RE.match(raw)
    if m is None or ".." in raw.split("/"):
        raise UserError(
            f"'{text}' is not a model reference.",
            hint="Write OWNER/REPO[:QUANT] or OWNER/REPO/FILE.gguf, "
            "e.g. Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M.",
        )
    file = m["file"]
    if file is not None and not file.lower().endswith(".gguf"):
        raise UserError(
            f"'{file}' in '{text}' is not a .gguf file.",
            hint="Name a .gguf file of the repo, or a quant tag after ':' (REPO:Q4_K_M).",
        )
    return Ref(m["repo"], m["quant"], file)


def quant_of(filename: str) -> str | None:
    """The quant tag in a GGUF file's name (`...-Q4_K_M.gguf` → `Q4_K_M`), upper case."""
    stem = Path(filename).name
    split = split_of(stem)
    stem = split[0] if split else stem[: -len(".gguf")] if stem.lower().endswith(".gguf") else stem
    found = [m["q"] for m in _QUANT_RE.finditer(stem)]
    return found[-1].upper() if found else None


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repo as the hub lists it."""

    name: str
    size: int | None = None
    sha256: str | None = None  # LFS files: the hub's sha256 of the content
    blob_id: str | None = None  # the git blob id (sha1), for files kept in git itself


@dataclass(frozen=True)
class Choice:
    """The file(s) that make one model: one file, or every part of a split model."""

    files: tuple[RemoteFile, ...]

    @property
    def first(self) -> RemoteFile:
        return self.files[0]

    @property
    def quant(self) -> str | None:
        return quant_of(self.first.name)

    @property
    def size(self) -> int:
        return sum(f.size or 0 for f in self.files)

    def label(self) -> str:
        parts = f" ({len(self.files)} parts)" if len(self.files) > 1 else ""
        return f"{self.first.name}{parts}"


def models_of(files: list[RemoteFile]) -> list[Choice]:
    """The GGUF models among a repo's files, split parts grouped under their first part."""
    groups: dict[str, list[RemoteFile]] = {}
    for f in sorted(files, key=lambda f: f.name):
        if not f.name.lower().endswith(".gguf"):
            continue
        split = split_of(Path(f.name).name)
        key = str(Path(f.name).parent / split[0]) + f"#{split[2]}" if split else f.name
        groups.setdefault(key, []).append(f)
    return [Choice(tuple(g)) for g in groups.values()]


def _is_projector(choice: Choice) -> bool:
    """A multimodal projector (mmproj-*.gguf) is not a model to serve on its own."""
    return "mmproj" in Path(choice.first.name).name.lower()


def _listing(models: list[Choice]) -> str:
    return (
        "; ".join(f"{m.label()} [{m.quant or 'no quant tag'}]" for m in models) or "no .gguf files"
    )


def choose(ref: Ref, files: list[RemoteFile]) -> Choice:
    """The model `ref` names among a repo's files; UserError with what the
    repo has when it names none or several."""
    models = models_of(files)
    if ref.file is not None:
        for m in models:
            if any(f.name == ref.file for f in m.files):
                return m
        raise UserError(
            f"{ref.repo} has no file {ref.file}; it has: {_listing(models)}.",
            hint=f"Pull one of them by name or by quant tag ({ref.repo}:QUANT).",
        )
    servable = [m for m in models if not _is_projector(m)]
    if ref.quant is not None:
        hits = [m for m in servable if (m.quant or "").upper() == ref.quant.upper()]
        if len(hits) == 1:
            return hits[0]
        if not hits:
            tags = sorted({m.quant for m in servable if m.quant})
            raise UserError(
                f"{ref.repo} has no {ref.quant.upper()} model; its quant tags are: "
                f"{', '.join(tags) or 'none'}.",
                hint=f"Pull {ref.repo}:TAG with one of them, or name the file: {_listing(servable)}.",
            )
        raise UserError(
            f"{ref} matches {len(hits)} models: {_listing(hits)}.",
            hint=f"Name the file instead: {ref.repo}/{hits[0].first.name}.",
        )
    if len(servable) == 1:
        return servable[0]
    default = [m for m in servable if m.quant == DEFAULT_QUANT]
    if len(default) == 1:
        return default[0]
    raise UserError(
        f"{ref.repo} has {len(servable)} models and the reference names none: {_listing(servable)}.",
        hint=f"Add a quant tag ({ref.repo}:{servable[0].quant or 'QUANT'}) or a file name.",
    )


# --- the catalog file -----------------------------------------------------------


@dataclass
class Entry:
    """One pulled model."""

    id: str
    repo: str
    revision: str
    files: list[dict[str, Any]]  # [{name, size, sha256}] in part order
    path: str  # the local path of the first (or only) file
    quant: str | None = None
    location: str = "models"  # "models": the home's models folder; "hf-cache": huggingface_hub's
    verified: str | None = None  # "sha256" (LFS), "git-sha1" (a file kept in git), None
    pulled_at: str = ""
    size: int = 0

    @property
    def paths(self) -> list[Path]:
        first = Path(self.path)
        return [first.with_name(Path(f["name"]).name) for f in self.files]

    def complete(self) -> bool:
        """Every part is on disk with its recorded size."""
        return all(
            p.is_file() and p.stat().st_size == f.get("size", p.stat().st_size)
            for p, f in zip(self.paths, self.files, strict=True)
        )

    def matches(self, ref: Ref) -> bool:
        if self.repo.lower() != ref.repo.lower():
            return False
        if ref.file is not None:
            return any(f["name"] == ref.file for f in self.files)
        if ref.quant is not None:
            return (self.quant or "").upper() == ref.quant.upper()
        return True


@dataclass
class Catalog:
    path: Path
    entries: list[Entry] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> Catalog:
        if not path.is_file():
            return cls(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            entries = [Entry(**e) for e in data.get("models", [])]
        except (OSError, ValueError, TypeError) as exc:
            raise UserError(
                f"The model catalog {path} cannot be read ({exc}).",
                hint="Fix or remove the file; pulled files stay in the models folder and "
                "`models pull` records them again without downloading.",
            ) from None
        return cls(path, entries)

    def save(self) -> None:
        data = {"version": 1, "models": [asdict(e) for e in self.entries]}
        atomic_write_text(self.path, json.dumps(data, indent=2) + "\n")

    def find(self, key: str) -> Entry | None:
        """The entry an id, a reference or the local path of its first file names."""
        if key.lower() in {e.id.lower() for e in self.entries}:
            return next(e for e in self.entries if e.id.lower() == key.lower())
        try:
            ref = parse_ref(key)
        except UserError:
            return None
        hits = [e for e in self.entries if e.matches(ref)]
        return hits[0] if len(hits) == 1 else None

    def put(self, entry: Entry) -> None:
        self.entries = [e for e in self.entries if e.id != entry.id] + [entry]

    def remove(self, entry: Entry) -> None:
        self.entries = [e for e in self.entries if e.id != entry.id]


def entry_id(repo: str, choice: Choice, files: list[RemoteFile]) -> str:
    """`REPO:QUANT` when the repo has one model of that quant, else `REPO/FILE`."""
    same = [m for m in models_of(files) if m.quant and m.quant == choice.quant]
    if choice.quant and len(same) == 1 and not _is_projector(choice):
        return f"{repo}:{choice.quant}"
    return f"{repo}/{choice.first.name}"


def catalog_path(home_root: Path) -> Path:
    return home_root / "state" / "models.json"


def model_file(path: str, config_dir: Path) -> Path:
    """The model file an instance config's `model.path` names: a relative
    path resolved against the config's folder; an `hf://` reference is the
    file the home's catalog has for it (the reference itself, which exists
    nowhere, while it is not pulled)."""
    if is_ref(path):
        # instances/<name>/config.json: the home is two folders up
        return resolve_local(config_dir.parent.parent, path) or Path(path)
    p = Path(path).expanduser()
    return p if p.is_absolute() else (config_dir / p).resolve()


def resolve_local(home_root: Path, text: str) -> Path | None:
    """The pulled file an `hf://` reference names in this home's catalog, if
    it is complete on disk."""
    try:
        entry = Catalog.load(catalog_path(home_root)).find(text)
    except UserError:
        return None
    return Path(entry.path) if entry is not None and entry.complete() else None
