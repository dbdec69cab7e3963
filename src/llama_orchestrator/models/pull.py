"""Pulling, listing and removing models: the use cases behind `models pull`,
`models list`, `models rm` and `init --model hf://...`.

The decisions are in `catalog` (which files a reference names), the network
in `hub`; this module checks the disk, verifies every file against the hub's
checksum before it is moved into place, and records what was pulled. Nothing
is recorded for a file that failed its check, and a failed file is removed.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llama_orchestrator.config.parse import load_settings
from llama_orchestrator.errors import OrchError, UserError
from llama_orchestrator.home import Home
from llama_orchestrator.models import hub
from llama_orchestrator.models.catalog import (
    Catalog,
    Choice,
    Entry,
    RemoteFile,
    catalog_path,
    choose,
    entry_id,
    is_ref,
    model_file,
    parse_ref,
    quant_of,
)
from llama_orchestrator.models.gguf import split_of, split_parts
from llama_orchestrator.units import human_bytes

__all__ = [
    "Pulled",
    "DiskFull",
    "ChecksumMismatch",
    "pull",
    "remove",
    "rows",
    "models_dir",
    "users_of",
    "local_model",
]

#: kept free beyond the download itself, so a pull never fills the disk the
#: state database and logs live on
DISK_MARGIN = 64 * 1024 * 1024


class DiskFull(OrchError):
    pass


class ChecksumMismatch(OrchError):
    pass


@dataclass
class Pulled:
    entry: Entry
    fetched: int = 0  # bytes downloaded by this pull
    notes: list[str] = field(default_factory=list)


def models_dir(home: Home) -> Path:
    """`settings.models.dir` (relative to the home), else `<home>/models`."""
    configured = load_settings(home.settings_path).models.dir
    if configured is None:
        return home.root / "models"
    p = Path(configured).expanduser()
    return p if p.is_absolute() else home.root / p


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _digests(path: Path) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file, in one read."""
    sha256 = hashlib.sha256()
    git = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha256.update(chunk)
            git.update(chunk)
    return sha256.hexdigest(), git.hexdigest()


def verify(path: Path, file: RemoteFile) -> tuple[str, str | None]:
    """(sha256 of `path`, how it was verified: "sha256", "git-sha1" or None when
    the hub gave no checksum). ChecksumMismatch when it gave one that differs."""
    sha256, git = _digests(path)
    blob_id = file.blob_id if file.blob_id and len(file.blob_id) == 40 else None
    # the hub's sha256 for LFS files, else the git blob id of a file kept in git
    how, ours, theirs = (
        ("sha256", sha256, file.sha256) if file.sha256 else ("git-sha1", git, blob_id)
    )
    if theirs is None:
        return sha256, None
    if ours != theirs.lower():
        raise ChecksumMismatch(
            f"{file.name} failed its checksum ({how} {ours[:12]}…, the hub says "
            f"{theirs[:12]}…); the download was removed and nothing was recorded.",
            hint="Pull again; if it fails again the file on the hub or a proxy is at fault.",
        )
    return sha256, how


def _check_space(folder: Path, need: int) -> None:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need + DISK_MARGIN > free:
        raise DiskFull(
            f"Not enough disk space in {probe}: the model needs {human_bytes(need)} more and "
            f"{human_bytes(free)} is free (keeping {human_bytes(DISK_MARGIN)} spare).",
            hint="Free some space, or pull into another folder (settings models.dir, or --cache).",
        )


def _entry(
    listing: hub.Listing,
    choice: Choice,
    paths: list[Path],
    sums: list[tuple[str, str | None]],
    location: str,
) -> Entry:
    kinds = {how for _, how in sums}
    return Entry(
        id=entry_id(listing.repo, choice, listing.files),
        repo=listing.repo,
        revision=listing.revision,
        files=[
            {"name": f.name, "size": p.stat().st_size, "sha256": sha}
            for f, p, (sha, _) in zip(choice.files, paths, sums, strict=True)
        ],
        path=str(paths[0]),
        quant=choice.quant,
        location=location,
        verified=kinds.pop() if len(kinds) == 1 else None,
        pulled_at=_now(),
        size=sum(p.stat().st_size for p in paths),
    )


def pull(
    home: Home,
    text: str,
    progress: hub.Progress,
    *,
    revision: str | None = None,
    use_cache: bool = False,
) -> Pulled:
    """Download the model `text` names (unless it is here already), verify it
    and record it in the catalog."""
    ref = parse_ref(text)
    catalog = Catalog.load(catalog_path(home.root))
    known = catalog.find(text)
    if known is not None and not known.complete():
        known = None
    if hub.offline():
        if known is not None and revision in (None, known.revision):
            return Pulled(known, notes=["offline: already pulled, not checked for updates"])
        raise hub.HubError(
            f"Offline (HF_HUB_OFFLINE is set), and {ref} has not been pulled.",
            hint="Pull it with a network, or unset HF_HUB_OFFLINE.",
        )
    try:
        listing = hub.list_files(ref, revision)
    except hub.HubError as exc:
        if known is None:
            raise
        return Pulled(known, notes=[f"{exc.message} Using the copy pulled on {known.pulled_at}."])
    choice = choose(ref, listing.files)
    entry = catalog.find(entry_id(listing.repo, choice, listing.files))
    if entry is not None and entry.revision == listing.revision and entry.complete():
        return Pulled(entry, notes=["already pulled and up to date"])

    cached = [hub.cached_file(listing.repo, f.name, listing.revision) for f in choice.files]
    if all(p is not None for p in cached):
        paths = [p for p in cached if p is not None]
        got = _entry(listing, choice, paths, _verified(paths, choice, keep=True), "hf-cache")
        fetched, notes = 0, ["found in the Hugging Face cache; nothing downloaded"]
    elif use_cache:
        _check_space(hub.cache_dir(), choice.size)
        paths = [hub.download_to_cache(listing, f) for f in choice.files]
        got = _entry(listing, choice, paths, _verified(paths, choice, keep=False), "hf-cache")
        fetched, notes = got.size, []
    else:
        got, fetched, notes = _pull_into(models_dir(home), listing, choice, progress)
    catalog.put(got)
    catalog.save()
    return Pulled(got, fetched=fetched, notes=notes)


def _verified(paths: list[Path], choice: Choice, *, keep: bool) -> list[tuple[str, str | None]]:
    """`verify` each file of the shared cache; one that fails is removed (its
    blob: the snapshot's link then dangles, which the library repairs by
    downloading again) unless `keep` (a file another tool put there)."""
    sums = []
    for p, f in zip(paths, choice.files, strict=True):
        try:
            sums.append(verify(p, f))
        except ChecksumMismatch:
            if not keep:
                p.resolve().unlink(missing_ok=True)
            raise
    return sums


def _pull_into(
    root: Path, listing: hub.Listing, choice: Choice, progress: hub.Progress
) -> tuple[Entry, int, list[str]]:
    """Each part into `root/OWNER/REPO`: resumed from its .part, verified, then
    renamed. Returns the entry, the bytes fetched now and notes."""
    folder = root / listing.repo
    dests = [folder / f.name for f in choice.files]
    todo = [
        (f, d)
        for f, d in zip(choice.files, dests, strict=True)
        if not (d.is_file() and d.stat().st_size == f.size)
    ]
    partial = sum(
        p.stat().st_size
        for _, d in todo
        for p in d.parent.glob(f"{d.name}.*.part")
        if d.parent.is_dir()
    )
    _check_space(folder, sum((f.size or 0) for f, _ in todo) - partial)
    sums = []
    fetched, resumed = 0, 0
    for f, dest in zip(choice.files, dests, strict=True):
        if (f, dest) in todo:
            part, offset = hub.download(listing, f, dest, progress)
            fetched += part.stat().st_size - offset
            resumed += offset
            lock = part.with_name(part.name + ".lock")
            try:
                sums.append(verify(part, f))
            except ChecksumMismatch:
                part.unlink(missing_ok=True)
                lock.unlink(missing_ok=True)
                _prune(folder, root)
                raise
            part.replace(dest)
            lock.unlink(missing_ok=True)
        else:
            sums.append(verify(dest, f))  # here already (an earlier pull, or copied in)
    notes = [] if todo else ["the files were here already; verified and recorded"]
    if resumed:
        notes.append(f"resumed: {human_bytes(resumed)} were here from an interrupted pull")
    return _entry(listing, choice, dests, sums, "models"), fetched, notes


# --- listing and removing ---------------------------------------------------------


def users_of(home: Home, entry: Entry) -> list[str]:
    """The instances whose config names this model (by path or by `hf://` reference)."""
    return _users(home, Path(entry.path), entry.id)


def _users(home: Home, path: Path, entry_id: str | None) -> list[str]:
    from llama_orchestrator.config.validate import load_all

    target = path.resolve()
    catalog = Catalog.load(catalog_path(home.root))
    names = []
    for item in load_all(home):
        if item.config is None:
            continue
        text = item.config.model.path
        if is_ref(text):
            found = catalog.find(text)
            if found is not None and found.id == entry_id:
                names.append(item.name)
        elif model_file(item.config.model.path, item.path.parent).resolve() == target:
            names.append(item.name)
    return names


def remove(home: Home, key: str) -> tuple[Entry, list[str]]:
    """Delete a pulled model's files (a copy in the shared Hugging Face cache
    stays: other tools may use it) and its catalog entry. Refused while an
    instance uses it. Returns the entry and notes."""
    catalog = Catalog.load(catalog_path(home.root))
    entry = catalog.find(key)
    if entry is None:
        ids = ", ".join(e.id for e in catalog.entries) or "none"
        raise UserError(
            f"No pulled model '{key}' (pulled: {ids}).", hint="See `llama-orch models list`."
        )
    users = users_of(home, entry)
    if users:
        raise UserError(
            f"{entry.id} is used by instance{'s' if len(users) > 1 else ''} {', '.join(users)}; nothing was removed.",
            hint="Point those instances at another model (or `rm` them) first.",
        )
    notes = []
    if entry.location == "models":
        for p in entry.paths:
            p.unlink(missing_ok=True)
        _prune(Path(entry.path).parent, models_dir(home))
    else:
        notes.append(
            f"the files stay in the shared Hugging Face cache ({Path(entry.path).parent}); "
            "remove them with `hf cache delete` if no other tool needs them"
        )
    catalog.remove(entry)
    catalog.save()
    return entry, notes


def _prune(folder: Path, stop: Path) -> None:
    """Remove empty folders from `folder` up to (not including) `stop`."""
    try:
        folder.relative_to(stop)
    except ValueError:
        return
    while folder != stop and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


def rows(home: Home, folder: Path | None = None) -> list[dict[str, Any]]:
    """What `models list` shows: catalog entries, then .gguf files under the
    models folder no entry names, then .gguf files in the shared Hugging Face
    cache; with `folder`, only the .gguf files under it. Each row carries the
    model's metadata (or `error` when its file cannot be read)."""
    if folder is not None:
        return [_untracked(home, p, "folder", None) for p in _first_parts(folder)]
    catalog = Catalog.load(catalog_path(home.root))
    out: list[dict[str, Any]] = []
    seen: set[Path] = set()
    for e in catalog.entries:
        seen |= {p.resolve() for p in e.paths}
        out.append(
            {
                "id": e.id,
                "repo": e.repo,
                "file": e.files[0]["name"],
                "parts": len(e.files),
                "quant": e.quant,
                "size_bytes": e.size,
                "sha256": e.files[0].get("sha256"),
                "verified": e.verified is not None,
                "verified_by": e.verified,
                "complete": e.complete(),
                "path": e.path,
                "location": e.location,
                "revision": e.revision,
                "pulled_at": e.pulled_at,
                "instances": users_of(home, e),
                **_meta(Path(e.path)),
            }
        )
    for path in _first_parts(models_dir(home)):
        if path.resolve() not in seen:
            out.append(_untracked(home, path, "models", None))
    for f in hub.cache_gguf_files():
        path = Path(f["path"])
        if path.resolve() in seen or _later_part(path):
            continue
        out.append({**_untracked(home, path, "hf-cache", f["repo"]), "revision": f["revision"]})
    return out


def _first_parts(folder: Path) -> list[Path]:
    """The .gguf files under `folder`, a split model by its first part only."""
    found = sorted(folder.rglob("*.gguf")) if folder.is_dir() else []
    return [p for p in found if not _later_part(p)]


def _meta(path: Path) -> dict[str, Any]:
    from llama_orchestrator.models.gguf import ModelError, read_model

    try:
        info = read_model(path).to_json()
    except ModelError as exc:
        return {"error": exc.message}
    info.pop("path")
    info.pop("size_bytes")
    return info


def _later_part(path: Path) -> bool:
    split = split_of(path.name)
    return split is not None and split[1] != 1


def _untracked(home: Home, path: Path, location: str, repo: str | None) -> dict[str, Any]:
    parts = split_parts(path)
    return {
        "id": None,
        "repo": repo,
        "file": path.name,
        "parts": len(parts),
        "quant": quant_of(path.name),
        "size_bytes": sum(p.stat().st_size for p in parts if p.exists()),
        "sha256": None,
        "verified": False,
        "verified_by": None,
        "complete": all(p.exists() for p in parts),
        "path": str(path),
        "location": location,
        "revision": None,
        "pulled_at": None,
        "instances": _users(home, path, None),
        **_meta(path),
    }


def local_model(home: Home, text: str, pull_one: Callable[[str], Pulled]) -> tuple[Path, list[str]]:
    """For `init --model`: a path stays a path; an `hf://` reference, or the id
    of a pulled model, becomes its local file, pulled now (by `pull_one`)
    when it is missing. Returns the path and what was done."""
    if not is_ref(text):
        entry = Catalog.load(catalog_path(home.root)).find(text)
        if entry is None or Path(text).exists() or not entry.complete():
            return Path(text).expanduser().absolute(), []
        return Path(entry.path), [f"model {entry.id}, pulled on {entry.pulled_at}"]
    done = pull_one(text)
    what = f"pulled now ({human_bytes(done.fetched)})" if done.fetched else "; ".join(done.notes)
    return Path(done.entry.path), [f"model {done.entry.id}: {what}"]
