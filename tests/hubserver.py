"""A Hugging Face Hub dataset repository served on loopback, for the real ``huggingface_hub`` client.

It answers the three requests the client makes for ``HfApi().dataset_info(..., files_metadata=True)`` and
``hf_hub_download`` (huggingface_hub 2.x, file_download.py / hf_api.py):

  GET  /api/datasets/{repo}/revision/{rev}?blobs=true   the listing: commit sha, and per file its size,
                                                         git blob id and, for LFS files, {sha256, size,
                                                         pointerSize}
  HEAD /datasets/{repo}/resolve/{rev}/{path}             the file's metadata in headers: X-Repo-Commit,
                                                         X-Linked-Etag (the LFS sha256, which the client
                                                         uses as the blob's name in its cache),
                                                         X-Linked-Size, ETag, Content-Length
  GET  /datasets/{repo}/resolve/{rev}/{path}             the bytes

The real Hub redirects LFS downloads to a CDN; the client takes the headers of whichever response it gets,
so this server answers directly. Faults are set per test: a status code for the requests of a method under a
path prefix (``fail``), an LFS sha256 that does not match the bytes (``advertised_sha256``), or a file listed
without LFS metadata (``no_lfs``). Every request is logged in ``requests`` as (method, path).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

LISTING = re.compile(r"^/api/datasets/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/]+)$")
RESOLVE = re.compile(r"^/datasets/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


def git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(content: bytes) -> bytes:
    sha256 = hashlib.sha256(content).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(content)}\n".encode()


@dataclass
class HubRepo:
    """One dataset repository at one commit: {path in the repo: bytes}; Parquet files are stored in LFS."""

    repo_id: str
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    advertised_sha256: dict[str, str] = field(default_factory=dict)  # path -> a (wrong) sha256 to list
    no_lfs: set[str] = field(default_factory=set)  # Parquet paths listed as plain git files
    # (method or "*", path prefix) -> HTTP status answered to every such request
    fail: dict[tuple[str, str], int] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)

    def is_lfs(self, path: str) -> bool:
        return path.endswith(".parquet") and path not in self.no_lfs

    def sha256(self, path: str) -> str:
        return self.advertised_sha256.get(path) or hashlib.sha256(self.files[path]).hexdigest()

    def listing(self) -> dict:
        siblings = []
        for path, content in sorted(self.files.items()):
            entry: dict = {"rfilename": path, "size": len(content)}
            if self.is_lfs(path):
                pointer = lfs_pointer(content)
                entry["blobId"] = git_blob_id(pointer)
                entry["lfs"] = {
                    "sha256": self.sha256(path),
                    "size": len(content),
                    "pointerSize": len(pointer),
                }
            else:
                entry["blobId"] = git_blob_id(content)
            siblings.append(entry)
        return {
            "_id": "loopback",
            "id": self.repo_id,
            "author": self.repo_id.split("/")[0],
            "sha": self.commit,
            "private": False,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "lastModified": "2024-01-04T16:33:51.000Z",
            "createdAt": "2022-03-02T23:29:22.000Z",
            "siblings": siblings,
        }


class _Handler(http.server.BaseHTTPRequestHandler):
    repo: HubRepo  # set on the subclass made per server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(status, body, {"Content-Type": "application/json", "X-Error-Message": message})

    def _handle(self) -> None:
        path = unquote(urlsplit(self.path).path)
        self.repo.requests.append((self.command, path))
        for (method, prefix), status in self.repo.fail.items():
            if method in ("*", self.command) and path.startswith(prefix):
                self._error(status, f"injected failure {status}")
                return
        if (match := LISTING.match(path)) and self.command == "GET":
            if match["repo"] != self.repo.repo_id:
                self._error(404, "Repository not found")
                return
            self._send(200, json.dumps(self.repo.listing()).encode(), {"Content-Type": "application/json"})
            return
        if match := RESOLVE.match(path):
            name = match["path"]
            if match["repo"] != self.repo.repo_id or name not in self.repo.files:
                self._error(404, "Entry not found")
                return
            content = self.repo.files[name]
            headers = {"X-Repo-Commit": self.repo.commit, "Accept-Ranges": "bytes"}
            if self.repo.is_lfs(name):
                sha256 = self.repo.sha256(name)
                headers |= {"ETag": f'"{sha256}"', "X-Linked-Etag": f'"{sha256}"'}
                headers["X-Linked-Size"] = str(len(content))
            else:
                headers["ETag"] = f'"{git_blob_id(content)}"'
            self._send(200, content, headers)
            return
        self._error(404, "not a Hub route")

    do_GET = _handle
    do_HEAD = _handle


@contextlib.contextmanager
def serve_hub(repo: HubRepo) -> Iterator[str]:
    """Serve ``repo`` on a free loopback port; yield the endpoint URL (the value for HF_ENDPOINT)."""
    handler = type("RepoHandler", (_Handler,), {"repo": repo})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
