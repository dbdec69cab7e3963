"""A Hugging Face Hub stand-in for the tests: the few endpoints the real
`huggingface_hub` client calls to list a model repo and download its files,
in the hub's URL scheme (point `HF_ENDPOINT` at it).

    GET  /api/models/{repo}[/revision/{rev}][?blobs=true]   model_info
    HEAD /{repo}/resolve/{rev}/{file}                        file metadata
    GET  /{repo}/resolve/{rev}/{file}                        the bytes, with Range

Files are served as Git LFS files (sha256 in the listing and as the ETag)
unless marked `in_git`, which are listed with their git blob id only, as the
hub does for small files. Faults for the tests: cut a download after N bytes
(then, optionally, refuse until cleared), stall one until released, serve
wrong bytes, require a token.
Every request is recorded.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

__all__ = ["FakeHub", "Repo"]


@dataclass
class Repo:
    files: dict[str, bytes]
    in_git: set[str] = field(default_factory=set)
    token: str | None = None  # a private repo: only this bearer token sees it
    gated: bool = False  # a gated repo: 403 GatedRepo without that token

    @property
    def sha(self) -> str:
        h = hashlib.sha1()
        for name in sorted(self.files):
            h.update(name.encode() + hashlib.sha256(self.files[name]).digest())
        return h.hexdigest()


def _git_blob(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


@dataclass
class Request:
    method: str
    path: str
    headers: Message  # looked up regardless of case, as HTTP headers are


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        #: file name -> bytes to send of the next GET before closing the connection
        self.cut_after: dict[str, int] = {}
        #: after a cut, answer 500 to GETs of that file until this is cleared
        self.refuse_after_cut = False
        self.refusing: set[str] = set()
        #: file name -> bytes to send of the next GET before stalling until `release` is set
        self.stall_after: dict[str, int] = {}
        self.release = threading.Event()
        #: file names served with one byte changed (the listing keeps the true sha256)
        self.corrupt: set[str] = set()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()

    def gets(self, name: str) -> list[Request]:
        return [r for r in self.requests if r.method == "GET" and r.path.endswith("/" + name)]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _repo(self, repo_id: str) -> Repo | str | None:
                """The repo, None when unknown (or private), "gated" when gated."""
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return None
                if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
                    return "gated" if repo.gated else None
                return repo

            def _send(
                self, code: int, body: bytes = b"", headers: dict[str, str] | None = None
            ) -> None:
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                if "Content-Length" not in (headers or {}):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _not_found(self, code: str) -> None:
                body = json.dumps({"error": f"{code}"}).encode()
                status = {"RepoNotFound": 401, "GatedRepo": 403}.get(code, 404)
                self._send(status, body, {"X-Error-Code": code, "Content-Type": "application/json"})

            def do_HEAD(self) -> None:
                self._serve()

            def do_GET(self) -> None:
                self._serve()

            def _serve(self) -> None:
                path = unquote(urlsplit(self.path).path)
                hub.requests.append(Request(self.command, path, self.headers))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    return self._info(parts[2:])
                if len(parts) >= 5 and parts[2] == "resolve":
                    return self._file("/".join(parts[:2]), parts[3], "/".join(parts[4:]))
                self._not_found("EntryNotFound")

            def _info(self, rest: list[str]) -> None:
                repo_id = "/".join(rest[:2])
                repo = self._repo(repo_id)
                if isinstance(repo, str):
                    return self._not_found("GatedRepo")
                if repo is None:
                    return self._not_found("RepoNotFound")
                if len(rest) > 2 and rest[2:4] != ["revision", "main"] and rest[3:4] != [repo.sha]:
                    return self._not_found("RevisionNotFound")
                siblings = []
                for name, data in sorted(repo.files.items()):
                    s: dict[str, object] = {
                        "rfilename": name,
                        "size": len(data),
                        "blobId": _git_blob(data),
                    }
                    if name not in repo.in_git:
                        sha = hashlib.sha256(data).hexdigest()
                        s["lfs"] = {"size": len(data), "sha256": sha, "pointerSize": 134}
                    siblings.append(s)
                body = json.dumps(
                    {"id": repo_id, "modelId": repo_id, "sha": repo.sha, "siblings": siblings}
                )
                self._send(200, body.encode(), {"Content-Type": "application/json"})

            def _file(self, repo_id: str, rev: str, name: str) -> None:
                repo = self._repo(repo_id)
                if isinstance(repo, str):
                    return self._not_found("GatedRepo")
                if repo is None:
                    return self._not_found("RepoNotFound")
                if rev not in ("main", repo.sha):
                    return self._not_found("RevisionNotFound")
                data = repo.files.get(name)
                if data is None:
                    return self._not_found("EntryNotFound")
                etag = _git_blob(data) if name in repo.in_git else hashlib.sha256(data).hexdigest()
                if name in hub.corrupt:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                headers = {
                    "X-Repo-Commit": repo.sha,
                    "ETag": f'"{etag}"',
                    "Accept-Ranges": "bytes",
                    "Content-Type": "application/octet-stream",
                }
                if name not in repo.in_git:
                    headers["X-Linked-Etag"] = f'"{etag}"'
                    headers["X-Linked-Size"] = str(len(data))
                if self.command == "HEAD":
                    return self._send(200, b"", {**headers, "Content-Length": str(len(data))})
                if name in hub.refusing:
                    return self._send(500, b"busy")
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    start = int(rng[len("bytes=") :].split("-")[0])
                body = data[start:]
                code = 206 if start else 200
                if start:
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                cut = hub.cut_after.pop(name, None)
                stall = hub.stall_after.pop(name, None)
                if stall is not None:
                    cut = stall
                if cut is not None:
                    if hub.refuse_after_cut:
                        hub.refusing.add(name)
                    self.send_response(code)
                    for k, v in {**headers, "Content-Length": str(len(body))}.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    if stall is not None:
                        hub.release.wait(30)
                    self.close_connection = True
                    return
                self._send(code, body, {**headers, "Content-Length": str(len(body))})

        return Handler
