"""A Hugging Face Hub served on loopback, for the real ``huggingface_hub`` client: dataset repositories to
download (the Hub data source) and model repositories to create, commit to and download (``cifar10 publish``,
then ``--model owner/name@revision``).

It answers the requests huggingface_hub 2.x makes (hf_api.py, file_download.py, _snapshot_download.py,
_commit_api.py, lfs.py), for datasets (``/datasets/`` and ``/api/datasets/``) and models (no prefix and
``/api/models/``) alike:

  GET  /api/{type}s/{repo}[/revision/{rev}]       the listing (``dataset_info``, ``model_info``, the
                                                   ``repo_info`` of snapshot_download): commit sha, and per
                                                   file its size, git blob id and, for LFS files, {sha256,
                                                   size, pointerSize}
  GET  /api/{type}s/{repo}/tree/{rev}              the recursive file tree (``list_repo_tree``: what
                                                   snapshot_download fetches and ``verify_repo_checksums``
                                                   checks against): {type, path, size, oid, lfs: {oid, size,
                                                   pointerSize}}
  HEAD [/datasets]/{repo}/resolve/{rev}/{path}     the file's metadata in headers: X-Repo-Commit,
                                                   X-Linked-Etag (the LFS sha256, which the client uses as
                                                   the blob's name in its cache), X-Linked-Size, ETag,
                                                   Content-Length
  GET  [/datasets]/{repo}/resolve/{rev}/{path}     the bytes
  POST /api/repos/create                           ``create_repo``: {name, organization, type}; 409 when it
                                                   exists (the client's exist_ok); a new repository holds one
                                                   commit with a .gitattributes, as on the Hub
  POST /api/validate-yaml                          the card's front matter, checked before a commit
  POST /api/{type}s/{repo}/preupload/{rev}         per file {path, size, sample}: uploadMode lfs or regular
                                                   (by the Hub's default .gitattributes suffixes, size and
                                                   binary sample) and the oid already there (the client
                                                   skips unchanged files)
  POST [/datasets]/{repo}.git/info/lfs/objects/batch  the LFS batch API: an upload action (PUT /lfs/{oid})
                                                   and a verify action (POST /lfs/verify) per object not
                                                   stored yet
  PUT  /lfs/{oid}                                  the LFS object's bytes (refused unless their sha256 is oid)
  POST /lfs/verify                                 {oid, size}: 200 when stored
  POST /api/{type}s/{repo}/commit/{rev}            ``create_commit``'s NDJSON: header, file (base64), lfsFile
                                                   (an uploaded oid), deletedFile, deletedFolder; answers
                                                   {commitOid, commitUrl}
  POST /api/{type}s/{repo}/tag/{rev}               ``create_tag``: {tag}

Errors carry the Hub's X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound), from which the client
raises its typed errors. The real Hub redirects LFS downloads to a CDN and hands LFS uploads to Xet storage
when hf_xet is installed; this server answers downloads directly and speaks only the "basic" LFS transfer,
so a client that uploads to it runs with ``HF_HUB_DISABLE_XET=1`` (its documented switch back to the LFS
protocol). One branch, ``main``; revisions are ``main``, a tag, or a commit sha.

Faults are set per test: a status code for the requests of a method under a path prefix (``fail``), an LFS
sha256 that does not match the bytes (``advertised_sha256``), a file listed without LFS metadata (``no_lfs``),
or a write token (``LoopbackHub.token``: writes without ``Authorization: Bearer <token>`` get 401). Every
request is logged in ``requests`` as (method, path).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import yaml

DEFAULT_COMMIT = "0123456789abcdef0123456789abcdef01234567"
_REPO = r"(?P<repo>[^/]+/[^/]+)"
INFO = re.compile(rf"^/api/(?P<kind>models|datasets)/{_REPO}(?:/revision/(?P<rev>[^/]+))?$")
API = re.compile(
    rf"^/api/(?P<kind>models|datasets)/{_REPO}/(?P<op>tree|preupload|commit|tag)/(?P<rev>[^/]+)$"
)
RESOLVE = re.compile(rf"^/(?:(?P<kind>datasets)/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
LFS_BATCH = re.compile(rf"^/(?:(?P<kind>datasets)/)?{_REPO}\.git/info/lfs/objects/batch$")
LFS_OBJECT = re.compile(r"^/lfs/(?P<oid>[0-9a-f]{64})$")
# Suffixes the Hub's default .gitattributes stores in LFS (a subset), and its size threshold for others.
LFS_SUFFIXES = (".safetensors", ".bin", ".parquet", ".pt", ".pth", ".npz", ".h5", ".onnx", ".msgpack")
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = "".join(
    f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES
).encode()


def git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(content: bytes) -> bytes:
    sha256 = hashlib.sha256(content).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(content)}\n".encode()


@dataclass
class HubRepo:
    """One repository: its files at the head of ``main`` (``commit``), and earlier commits in ``history``.

    Parquet files are stored in LFS, and so is every file a commit sent as an LFS file (``lfs_paths``).
    """

    repo_id: str
    files: dict[str, bytes]
    commit: str = DEFAULT_COMMIT
    repo_type: str = "dataset"
    advertised_sha256: dict[str, str] = field(default_factory=dict)  # path -> a (wrong) sha256 to list
    no_lfs: set[str] = field(default_factory=set)  # Parquet paths listed as plain git files
    # (method or "*", path prefix) -> HTTP status answered to every such request
    fail: dict[tuple[str, str], int] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    lfs_paths: set[str] = field(default_factory=set)
    history: dict[str, dict[str, bytes]] = field(default_factory=dict)  # earlier commit -> its files
    tags: dict[str, str] = field(default_factory=dict)  # tag -> commit

    def resolve(self, revision: str) -> str | None:
        """The commit ``revision`` (``main``, a tag or a commit sha) names, None when it names none."""
        if revision == "main" or revision == self.commit:
            return self.commit
        if revision in self.tags:
            return self.tags[revision]
        return revision if revision in self.history else None

    def files_at(self, commit: str) -> dict[str, bytes]:
        return self.files if commit == self.commit else self.history[commit]

    def is_lfs(self, path: str) -> bool:
        return path in self.lfs_paths or (path.endswith(".parquet") and path not in self.no_lfs)

    def sha256(self, path: str, commit: str | None = None) -> str:
        content = self.files_at(commit or self.commit)[path]
        return self.advertised_sha256.get(path) or hashlib.sha256(content).hexdigest()

    def blob(self, path: str, commit: str) -> tuple[int, str, dict | None]:
        """(size, git blob id, LFS {sha256, size, pointerSize} or None) of a file at ``commit``."""
        content = self.files_at(commit)[path]
        if not self.is_lfs(path):
            return len(content), git_blob_id(content), None
        pointer = lfs_pointer(content)
        lfs = {"sha256": self.sha256(path, commit), "size": len(content), "pointerSize": len(pointer)}
        return len(content), git_blob_id(pointer), lfs

    def listing(self, commit: str | None = None) -> dict:
        commit = commit or self.commit
        siblings = []
        for path in sorted(self.files_at(commit)):
            size, blob_id, lfs = self.blob(path, commit)
            siblings.append(
                {"rfilename": path, "size": size, "blobId": blob_id} | ({"lfs": lfs} if lfs else {})
            )
        return {
            "_id": "loopback",
            "id": self.repo_id,
            "author": self.repo_id.split("/")[0],
            "sha": commit,
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

    def tree(self, commit: str) -> list[dict]:
        """The recursive tree as ``list_repo_tree`` reads it (an LFS file's sha256 as ``lfs.oid``)."""
        entries = []
        for path in sorted(self.files_at(commit)):
            size, blob_id, lfs = self.blob(path, commit)
            entry = {"type": "file", "path": path, "size": size, "oid": blob_id}
            if lfs:
                entry["lfs"] = {"oid": lfs["sha256"], "size": lfs["size"], "pointerSize": lfs["pointerSize"]}
            entries.append(entry)
        return entries

    def add_commit(self, files: dict[str, bytes], lfs_paths: set[str], summary: str) -> str:
        """Make ``files`` the new head of ``main``; return the new commit's sha."""
        digest = hashlib.sha1(self.commit.encode() + summary.encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
        self.history[self.commit] = self.files
        self.files, self.commit = files, digest.hexdigest()
        self.lfs_paths |= lfs_paths
        return self.commit


@dataclass
class LoopbackHub:
    """Several repositories behind one endpoint, and the LFS objects uploaded to it.

    ``user`` is the namespace ``create_repo`` uses when given no organisation; ``token``, when set, is the
    only credential write requests are accepted with."""

    repos: list[HubRepo] = field(default_factory=list)
    user: str = "loopback-user"
    token: str | None = None
    lfs_objects: dict[str, bytes] = field(default_factory=dict)  # sha256 -> bytes
    fail: dict[tuple[str, str], int] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)

    def find(self, kind: str | None, repo_id: str) -> HubRepo | None:
        repo_type = "dataset" if kind in ("datasets", "dataset") else "model"
        return next((r for r in self.repos if r.repo_id == repo_id and r.repo_type == repo_type), None)

    def repo(self, repo_id: str, repo_type: str = "model") -> HubRepo:
        found = self.find(repo_type, repo_id)
        assert found is not None, f"no {repo_type} repository {repo_id} on the loopback Hub"
        return found


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def _repo_not_found() -> _HubError:
    return _HubError(404, "Repository not found", "RepoNotFound")


class _Handler(http.server.BaseHTTPRequestHandler):
    hub: LoopbackHub  # set on the subclass made per server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    # ------------------------------------------------------------------------------------------ plumbing

    @property
    def endpoint(self) -> str:
        return f"http://{self.headers['Host']}"

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, payload: object, status: int = 200) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json"})

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers, then the blank line
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _check_token(self) -> None:
        if self.hub.token is not None and self.headers.get("Authorization") != f"Bearer {self.hub.token}":
            raise _HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, match: re.Match) -> HubRepo:
        repo = self.hub.find(match["kind"], unquote(match["repo"]))
        if repo is None:
            raise _repo_not_found()
        return repo

    def _commit_of(self, repo: HubRepo, revision: str) -> str:
        commit = repo.resolve(unquote(revision))
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {unquote(revision)}", "RevisionNotFound")
        return commit

    def _handle(self) -> None:
        raw_path = urlsplit(self.path).path
        path = unquote(raw_path)
        self.hub.requests.append((self.command, path))
        for (method, prefix), status in self.hub.fail.items():
            if method in ("*", self.command) and path.startswith(prefix):
                self._body()
                self._error(status, f"injected failure {status}")
                return
        try:
            self._route(raw_path)
        except _HubError as exc:
            self._error(exc.status, str(exc), exc.code)

    # ------------------------------------------------------------------------------------------- routes

    def _route(self, raw_path: str) -> None:
        command = self.command
        if command in ("GET", "HEAD") and (match := RESOLVE.match(raw_path)):
            self._resolve(match)
        elif command == "GET" and (match := INFO.match(raw_path)):
            repo = self._repo(match)
            self._json(repo.listing(self._commit_of(repo, match["rev"] or "main")))
        elif match := API.match(raw_path):
            getattr(self, f"_{match['op']}")(match)
        elif command == "POST" and raw_path == "/api/repos/create":
            self._create_repo()
        elif command == "POST" and raw_path == "/api/validate-yaml":
            self._validate_yaml()
        elif command == "POST" and (match := LFS_BATCH.match(raw_path)):
            self._lfs_batch(match)
        elif command == "PUT" and (match := LFS_OBJECT.match(raw_path)):
            content = self._body()
            if hashlib.sha256(content).hexdigest() != match["oid"]:
                raise _HubError(400, "the uploaded bytes do not match the object's sha256")
            self.hub.lfs_objects[match["oid"]] = content
            self._send(200)
        elif command == "POST" and raw_path == "/lfs/verify":
            request = json.loads(self._body())
            stored = self.hub.lfs_objects.get(request["oid"])
            if stored is None or len(stored) != request["size"]:
                raise _HubError(404, "object not uploaded")
            self._json({"success": True})
        else:
            self._body()
            raise _HubError(404, "not a Hub route")

    def _resolve(self, match: re.Match) -> None:
        repo = self._repo(match)
        commit = self._commit_of(repo, match["rev"])
        name = unquote(match["path"])
        files = repo.files_at(commit)
        if name not in files:
            raise _HubError(404, "Entry not found", "EntryNotFound")
        content = files[name]
        headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if repo.is_lfs(name):
            sha256 = repo.sha256(name, commit)
            headers |= {"ETag": f'"{sha256}"', "X-Linked-Etag": f'"{sha256}"'}
            headers["X-Linked-Size"] = str(len(content))
        else:
            headers["ETag"] = f'"{git_blob_id(content)}"'
        self._send(200, content, headers)

    def _tree(self, match: re.Match) -> None:
        repo = self._repo(match)
        self._json(repo.tree(self._commit_of(repo, match["rev"])))

    def _create_repo(self) -> None:
        request = json.loads(self._body())
        self._check_token()
        repo_id = f"{request.get('organization') or self.hub.user}/{request['name']}"
        repo_type = request.get("type") or "model"
        if self.hub.find(repo_type, repo_id) is not None:
            raise _HubError(409, f"You already created this {repo_type} repo")
        initial = hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()
        self.hub.repos.append(HubRepo(repo_id, {".gitattributes": GITATTRIBUTES}, initial, repo_type))
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        self._json({"url": f"{self.endpoint}/{prefix}{repo_id}", "name": repo_id, "id": repo_id})

    def _validate_yaml(self) -> None:
        content = json.loads(self._body())["content"]
        front = content.split("---\n")[1] if content.startswith("---\n") else ""
        try:
            if not isinstance(yaml.safe_load(front) or {}, dict):
                raise yaml.YAMLError("the metadata is not a mapping")
        except yaml.YAMLError as exc:
            self._json({"errors": [{"message": str(exc)}], "warnings": []}, status=400)
            return
        self._json({"errors": [], "warnings": []})

    def _preupload(self, match: re.Match) -> None:
        request = json.loads(self._body())
        self._check_token()
        repo = self._repo(match)
        head = repo.files_at(self._commit_of(repo, match["rev"]))
        answers = []
        for item in request["files"]:
            name, sample = item["path"], base64.b64decode(item["sample"])
            lfs = name.endswith(LFS_SUFFIXES) or item["size"] >= LFS_MIN_SIZE or b"\0" in sample
            oid = None
            if name in head:  # what the client compares with its own: sha256 for LFS, git blob id otherwise
                oid = hashlib.sha256(head[name]).hexdigest() if lfs else git_blob_id(head[name])
            answers.append({"path": name, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": oid})  # fmt: skip
        self._json({"files": answers, "commitOid": repo.commit})

    def _lfs_batch(self, match: re.Match) -> None:
        request = json.loads(self._body())
        self._check_token()
        self._repo(match)
        if "basic" not in request.get("transfers", ["basic"]):
            raise _HubError(400, "this Hub speaks the basic LFS transfer only")
        objects = []
        for item in request["objects"]:
            answer = {"oid": item["oid"], "size": item["size"]}
            if item["oid"] not in self.hub.lfs_objects:
                answer["actions"] = {
                    "upload": {"href": f"{self.endpoint}/lfs/{item['oid']}"},
                    "verify": {"href": f"{self.endpoint}/lfs/verify"},
                }
            objects.append(answer)
        self._json({"transfer": "basic", "objects": objects})

    def _commit(self, match: re.Match) -> None:
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        self._check_token()
        repo = self._repo(match)
        if unquote(match["rev"]) != "main":
            raise _HubError(404, f"Invalid rev id: {unquote(match['rev'])}", "RevisionNotFound")
        files, lfs_paths, summary = dict(repo.files), set(), ""
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "header":
                summary = value["summary"]
                if value.get("parentCommit") not in (None, repo.commit):
                    raise _HubError(412, "parentCommit is not the head of the branch")
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                content = self.hub.lfs_objects.get(value["oid"])
                if content is None:
                    raise _HubError(422, f"{value['path']}: LFS object {value['oid']} was not uploaded")
                files[value["path"]] = content
                lfs_paths.add(value["path"])
            elif key == "deletedFile":
                del files[value["path"]]
            elif key == "deletedFolder":
                files = {p: c for p, c in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:
                raise _HubError(400, f"unknown commit operation {key!r}")
        commit = repo.add_commit(files, lfs_paths, summary)
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        url = f"{self.endpoint}/{prefix}{repo.repo_id}/commit/{commit}"
        self._json({"success": True, "commitOid": commit, "commitUrl": url, "pullRequestUrl": None})

    def _tag(self, match: re.Match) -> None:
        request = json.loads(self._body())
        self._check_token()
        repo = self._repo(match)
        commit = self._commit_of(repo, match["rev"])
        if request["tag"] in repo.tags:
            raise _HubError(409, f"Tag {request['tag']} already exists")
        repo.tags[request["tag"]] = commit
        self._json({})

    do_GET = _handle
    do_HEAD = _handle
    do_POST = _handle
    do_PUT = _handle


@contextlib.contextmanager
def serve_hub(target: HubRepo | LoopbackHub) -> Iterator[str]:
    """Serve one repository or a whole ``LoopbackHub`` on a free loopback port; yield the endpoint URL (the
    value for HF_ENDPOINT). A lone repository's ``requests`` and ``fail`` are the server's."""
    hub = target if isinstance(target, LoopbackHub) else LoopbackHub([target], fail=target.fail,
                                                                       requests=target.requests)  # fmt: skip
    handler = type("HubHandler", (_Handler,), {"hub": hub})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
