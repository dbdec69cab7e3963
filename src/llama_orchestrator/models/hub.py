"""The Hugging Face Hub, through its own client library (`huggingface_hub`).

A thin adapter: the library lists a repo's files with their LFS checksums,
builds authenticated headers (`HF_TOKEN` or a stored `hf auth login`), reads
`HF_ENDPOINT` and offline mode, resolves redirects, streams a file with its
retrying resume (`http_get`), and owns the shared cache layout. What it does
not do any more (since 1.x a partial download is discarded when the process
ends) is resume across runs, so for the home's models folder the transfer
goes into our own `<file>.<etag>.part`, handed to `http_get` with its size as
`resume_size`: an interrupted pull continues where it stopped.

Every failure leaves here as one OrchError sentence (HubError); the library is
imported lazily (it costs ~0.3 s) so no other command pays for it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from llama_orchestrator.errors import OrchError, UserError
from llama_orchestrator.models.catalog import Ref, RemoteFile

__all__ = [
    "HubError",
    "Listing",
    "Progress",
    "list_files",
    "download",
    "download_to_cache",
    "cached_file",
    "cache_gguf_files",
    "offline",
    "endpoint",
    "cache_dir",
]


class HubError(OrchError):
    """The hub could not be used (unreachable, offline, refused): exit 1."""


class Progress(Protocol):
    """What a download reports to (the CLI draws a rich bar from it)."""

    def start(self, name: str, total: int | None, done: int) -> None: ...

    def advance(self, n: int) -> None: ...

    def reset(self, done: int) -> None: ...


@dataclass(frozen=True)
class Listing:
    """A repo at one commit."""

    repo: str
    revision: str  # the commit sha: every part is fetched from this one commit
    files: list[RemoteFile]


def endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def cache_dir() -> Path:
    """The shared cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


@contextlib.contextmanager
def _one_sentence(repo: str) -> Iterator[None]:
    """Turn the library's exceptions into one sentence with the fix."""
    from huggingface_hub import errors

    try:
        yield
    except errors.GatedRepoError:
        raise UserError(
            f"{repo} is gated: its owners ask you to accept their terms first.",
            hint=f"Accept them at {endpoint()}/{repo}, then set HF_TOKEN (or run `hf auth login`).",
        ) from None
    except errors.RepositoryNotFoundError:
        raise UserError(
            f"{endpoint()} has no repo {repo} (or it is private and no token was given).",
            hint="Check the name; for a private repo set HF_TOKEN (or run `hf auth login`).",
        ) from None
    except errors.RevisionNotFoundError:
        raise UserError(
            f"{repo} has no such revision.", hint="Check --revision (a branch, tag or commit)."
        ) from None
    except errors.EntryNotFoundError as exc:
        raise UserError(f"{repo}: {exc}", hint="Check the file name.") from None
    except errors.OfflineModeIsEnabled:
        raise HubError(
            f"Offline (HF_HUB_OFFLINE is set), and {repo} is not pulled completely.",
            hint="Unset HF_HUB_OFFLINE with a network, or pull on a machine that has one.",
        ) from None
    except errors.HfHubHTTPError as exc:
        code = exc.response.status_code if exc.response is not None else "?"
        raise HubError(
            f"{endpoint()} answered HTTP {code} for {repo}.",
            hint="Try again later; a partial download is kept and resumed.",
        ) from None
    except errors.HTTPError as exc:  # transport: refused, reset, timed out, DNS
        raise HubError(
            f"Cannot reach {endpoint()} ({type(exc).__name__}: {exc}).",
            hint="Check the network (or HF_ENDPOINT); a partial download is kept and resumed.",
        ) from None


def list_files(ref: Ref, revision: str | None = None) -> Listing:
    """The repo's files with sizes and checksums, at `revision` (default: main)."""
    from huggingface_hub import HfApi

    with _one_sentence(ref.repo):
        info = HfApi().model_info(ref.repo, revision=revision, files_metadata=True)
    files = [
        RemoteFile(
            name=s.rfilename,
            size=s.size if s.size is not None else (s.lfs.size if s.lfs else None),
            sha256=s.lfs.sha256 if s.lfs else None,
            blob_id=s.blob_id,
        )
        for s in info.siblings or []
    ]
    if not info.sha:
        raise HubError(f"{endpoint()} gave no commit for {ref.repo}.")
    return Listing(ref.repo, info.sha, files)


class _Counted:
    """The file object `http_get` writes to, reporting each write (and its
    rewind when a server ignores a Range request) to the progress bar."""

    def __init__(self, f: BinaryIO, progress: Progress) -> None:
        self._f, self._progress = f, progress

    def write(self, data: bytes) -> int:
        n = self._f.write(data)
        self._progress.advance(len(data))
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def truncate(self, size: int | None = None) -> int:
        n = self._f.truncate(size)
        self._progress.reset(self._f.tell())
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def part_path(dest: Path, etag: str) -> Path:
    """Where an unfinished download of `dest` lies; named by the hub's etag,
    so a file changed upstream never resumes onto an old partial."""
    return dest.with_name(f"{dest.name}.{etag[:16]}.part")


def download(
    listing: Listing, file: RemoteFile, dest: Path, progress: Progress
) -> tuple[Path, int]:
    """Fetch one file of the listing into `dest`'s folder as its `.part`,
    resuming a partial one. Returns the `.part` path (complete; the caller
    verifies it and moves it into place) and the size it resumed from."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import WeakFileLock, build_hf_headers, disable_progress_bars

    url = hf_hub_url(listing.repo, file.name, revision=listing.revision)
    headers = build_hf_headers()
    with _one_sentence(listing.repo):
        meta = get_hf_file_metadata(url, headers=headers)
        etag = (meta.etag or file.sha256 or file.blob_id or listing.revision).strip('"')
        part = part_path(dest, etag)
        for stale in dest.parent.glob(f"{dest.name}.*.part"):
            if stale != part:
                stale.unlink(missing_ok=True)  # an older version of the file
        dest.parent.mkdir(parents=True, exist_ok=True)
        size = meta.size if meta.size is not None else file.size
        # two pulls of one file at once must not append to the same .part
        with WeakFileLock(part.with_name(part.name + ".lock")), open(part, "ab") as f:
            done = resumed = f.tell()
            progress.start(file.name, size, done)
            try:
                if size is None or done < size:
                    disable_progress_bars("huggingface_hub.http_get")  # `progress` draws ours
                    http_get(
                        meta.location or url,
                        _Counted(f, progress),  # type: ignore[arg-type]
                        resume_size=done,
                        headers=headers,
                        expected_size=size,
                    )
            except KeyboardInterrupt:
                # what the kept file holds: ^C may land between a write and its count
                progress.reset(f.tell())
                raise
    return part, resumed


def download_to_cache(listing: Listing, file: RemoteFile) -> Path:
    """Fetch one file into the shared huggingface_hub cache (its own layout,
    locks and progress bar) and return its snapshot path."""
    from huggingface_hub import hf_hub_download

    with _one_sentence(listing.repo):
        return Path(hf_hub_download(listing.repo, file.name, revision=listing.revision))


def cached_file(repo: str, name: str, revision: str) -> Path | None:
    """The file at this commit in the shared huggingface_hub cache, if there."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, name, revision=revision)
    return Path(found) if isinstance(found, str) else None


def cache_gguf_files() -> list[dict[str, Any]]:
    """Every .gguf file in the shared huggingface_hub cache (HF_HUB_CACHE):
    {repo, revision, name, path, size}. An absent or unreadable cache is empty."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound, CorruptedCacheException

    try:
        info = scan_cache_dir()
    except (CacheNotFound, CorruptedCacheException, OSError):
        return []
    rows = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            for f in rev.files:
                if f.file_name.lower().endswith(".gguf"):
                    rows.append(
                        {
                            "repo": repo.repo_id,
                            "revision": rev.commit_hash,
                            "name": str(f.file_path.relative_to(rev.snapshot_path)),
                            "path": str(f.file_path),
                            "size": f.size_on_disk,
                        }
                    )
    return rows
