"""A tiny fake of the Hugging Face Hub and ModelScope HTTP APIs, for offline tests.

The real client libraries (huggingface_hub 2.x, modelscope 1.40 / modelscope_hub) are pointed at it through their
endpoint settings, so tests exercise the real listing/download code paths, including resume and auth handling:

    hub = FakeHub(); hub.start()
    hub.add_file("org/repo", "model.gguf", b"...")
    HfApi(endpoint=hub.url).model_info("org/repo", files_metadata=True)
    hf_hub_download("org/repo", "model.gguf", endpoint=hub.url, cache_dir=tmp)
    modelscope.hub.file_download.model_file_download("org/repo", "model.gguf", revision="master",
                                                     endpoint=hub.url, cache_dir=tmp)
    hub.stop()

Routes (only what the clients call):
  HF  GET  /api/models/{repo}[/revision/{rev}]        model_info (siblings with size + lfs.sha256)
  HF  GET  /api/models/{repo}/tree/{rev}[/{path}]     list_repo_tree / list_repo_files
  HF  HEAD|GET /{repo}/resolve/{rev}/{file}           hf_hub_download (metadata HEAD, then GET)
  MS  GET  /api/v1/models/{repo}/revisions            revision resolution when revision=None
  MS  GET  /api/v1/models/{repo}/repo/files?Revision= file listing (Path, Size, Sha256)
  MS  GET  /api/v1/models/{repo}/repo?Revision=&FilePath=  file download
  URL HEAD|GET /files/{path}                          a plain web server (add_url_file): ETag, Range, 404
Every file is served as if LFS-tracked: its sha256 is its HF ETag and its ModelScope Sha256.
Fault knobs: cut_after (drop the connection mid-body), stall_after (hang mid-body until stop()), pause_after
(hang mid-body until the test lets it finish), corrupt_sha, require_token, and per plain file ignore_range (answer
200 to every Range request).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

# ModelScope's default branch is "master", Hugging Face's is "main": a file added at one is served at both names,
# so tests can use each client's natural default.
_DEFAULT_BRANCHES = ("main", "master")


def _norm_rev(revision: str) -> str:
    return "main" if revision in _DEFAULT_BRANCHES else revision


@dataclass
class _File:
    data: bytes
    sha256: str  # what the hub advertises; differs from the data's hash after corrupt_sha()
    hubs: tuple[str, ...]
    ignore_range: bool = False  # answer every Range request with the whole file (200), as some servers do


class FakeHub:
    """Fake HF + ModelScope hub on 127.0.0.1. Usable as a context manager (starts and stops the server)."""

    def __init__(self, *, ms_linked_etag: bool = True) -> None:
        # repo_id -> revision -> filename -> _File
        self.repos: dict[str, dict[str, dict[str, _File]]] = {}
        self.tokens: dict[str, str] = {}
        # (repo, file) -> [n_bytes, remaining times, offset?]; plain files use repo "" and their URL path.
        self.cuts: dict[tuple[str, str], list[int]] = {}
        # (repo, file) -> (file offset where the body hangs, event that lets it finish: None = only stop())
        self.stalls: dict[tuple[str, str], tuple[int, threading.Event | None]] = {}
        self.plain: dict[str, _File] = {}  # URL path -> file, for add_url_file
        self._release = threading.Event()  # set by stop(): stalled responses give up
        # (method, path with query, headers with lower-cased names) for every request received.
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        # ModelScope's CDN sends the object sha256 as X-Linked-ETag and modelscope_hub then verifies the download
        # itself. Set False to make the fake stay silent, so only the caller's own check can catch corrupt_sha().
        self.ms_linked_etag = ms_linked_etag
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "FakeHub not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeHub:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)  # port 0: the OS picks a free port
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="FakeHub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- content and fault knobs -----------------------------------------------------------------------------------
    def add_file(self, repo_id: str, filename: str, data: bytes, *, revision: str = "main",
                 hubs: tuple[str, ...] = ("hf", "ms")) -> None:
        f = _File(data, hashlib.sha256(data).hexdigest(), tuple(hubs))
        with self._lock:
            self.repos.setdefault(repo_id, {}).setdefault(_norm_rev(revision), {})[filename] = f

    def add_url_file(self, path: str, data: bytes, *, ignore_range: bool = False) -> str:
        """Serve `data` at /files/{path} as a plain web server would (ETag = its sha256); return the full URL.

        Adding the same path again replaces the content, and so the ETag, as a re-uploaded file would.
        """
        f = _File(data, hashlib.sha256(data).hexdigest(), (), ignore_range)
        with self._lock:
            self.plain["/files/" + path.lstrip("/")] = f
        return f"{self.url}/files/{path.lstrip('/')}"

    def require_token(self, repo_id: str, token: str) -> None:
        self.tokens[repo_id] = token

    def cut_after(self, repo_id: str, filename: str, n_bytes: int, times: int = 1, *, offset: bool = False) -> None:
        """The next `times` GETs of the file announce the full length but drop the connection after n_bytes.

        With offset=True, n_bytes is a position in the file instead: the connection always dies there, so a request
        resuming at or past it gets its headers and no body at all (a link that breaks at the same place every time).
        For a plain file (add_url_file), repo_id is "" and filename is its path under /files/.
        """
        with self._lock:
            self.cuts[(repo_id, filename)] = [n_bytes, times, offset]

    def stall_after(self, repo_id: str, filename: str, n_bytes: int) -> None:
        """The next GET of the file sends the body up to file offset n_bytes, then hangs until stop().

        For killing or interrupting a client mid-download at a known point.
        """
        with self._lock:
            self.stalls[(repo_id, filename)] = (n_bytes, None)

    def pause_after(self, repo_id: str, filename: str, n_bytes: int) -> threading.Event:
        """The next GET of the file sends the body up to file offset n_bytes, then waits for the returned event
        before sending the rest (stop() ends it instead).

        The test decides how long the download lasts, so another client provably arrives while it is under way.
        """
        resume = threading.Event()
        with self._lock:
            self.stalls[(repo_id, filename)] = (n_bytes, resume)
        return resume

    def corrupt_sha(self, repo_id: str, filename: str) -> None:
        """Advertise a sha256 (HF ETag/lfs.sha256, MS Sha256/X-Linked-ETag) that does not match the served bytes."""
        with self._lock:
            for files in self.repos[repo_id].values():
                if filename in files:
                    files[filename].sha256 = hashlib.sha256(b"corrupt:" + files[filename].data).hexdigest()

    def commit(self, repo_id: str, revision: str) -> str:
        """The 40-hex commit id the hub reports for a branch (clients key their caches on it)."""
        return hashlib.sha1(f"{repo_id}@{_norm_rev(revision)}".encode()).hexdigest()

    # -- lookups used by the handler --------------------------------------------------------------------------------
    def _files(self, repo_id: str, revision: str, hub: str) -> dict[str, _File] | None:
        """Files of a revision (branch name or its commit id) visible on `hub`; None if the revision is unknown."""
        revs = self.repos.get(repo_id, {})
        for name, files in revs.items():
            if _norm_rev(revision) == name or revision == self.commit(repo_id, name):
                return {fn: f for fn, f in files.items() if hub in f.hubs}
        return None

    def _has_repo(self, repo_id: str, hub: str) -> bool:
        return any(hub in f.hubs for files in self.repos.get(repo_id, {}).values() for f in files.values())

    def _take_cut(self, repo_id: str, filename: str, start: int) -> int | None:
        """Body bytes to send before dropping the connection of a response starting at file offset `start`."""
        with self._lock:
            cut = self.cuts.get((repo_id, filename))
            if not cut or cut[1] <= 0:
                return None
            cut[1] -= 1
            return max(cut[0] - start, 0) if cut[2] else cut[0]

    def _take_stall(self, repo_id: str, filename: str, start: int) -> tuple[int, threading.Event | None] | None:
        with self._lock:
            stall = self.stalls.pop((repo_id, filename), None)
        return None if stall is None else (max(stall[0] - start, 0), stall[1])


_HF_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$")
_HF_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_HF_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_MS = re.compile(r"^/api/v1/models/(?P<repo>[^/]+/[^/]+)/(?P<what>revisions|repo/files|repo)$")


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, like the real hubs: every response carries a Content-Length

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_GET(self) -> None:
        self._dispatch()

    # -- plumbing ---------------------------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        hub = self.hub
        with hub._lock:
            hub.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
        parts = urlsplit(self.path)
        path, query = unquote(parts.path), {k: v[0] for k, v in parse_qs(parts.query).items()}
        if m := _MS.match(path):
            return self._ms(m["repo"], m["what"], query)
        if self.command == "GET" and (m := _HF_TREE.match(path)):
            return self._hf_tree(m["repo"], m["rev"], m["path"])
        if self.command == "GET" and (m := _HF_INFO.match(path)):
            return self._hf_info(m["repo"], m["rev"] or "main")
        if m := _HF_RESOLVE.match(path):
            return self._hf_resolve(m["repo"], m["rev"], m["file"])
        if path.startswith("/files/"):
            return self._plain(path)
        # e.g. modelscope's /api/v1/repos/internalAccelerationInfo region probe: a 404 makes it skip acceleration
        self._reply(404, b"not found", {"Content-Type": "text/plain"})

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        headers = {"Content-Length": str(len(body)), **(headers or {})}
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict[str, str] | None = None) -> None:
        self._reply(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _auth(self, repo_id: str) -> str:
        """'ok', 'missing' or 'wrong'. ModelScope sends the token both as Bearer and as the m_session_id cookie."""
        want = self.hub.tokens.get(repo_id)
        if want is None:
            return "ok"
        bearer = self.headers.get("Authorization", "")
        cookie = re.search(r"(?:^|;\s*)m_session_id=([^;]+)", self.headers.get("Cookie", ""))
        if bearer == f"Bearer {want}" or (cookie and cookie[1] == want):
            return "ok"
        return "wrong" if bearer or cookie else "missing"

    def _send_file(self, f: _File, repo_id: str, filename: str, headers: dict[str, str]) -> None:
        """200 or 206 (Range: bytes=a-[b]), optionally dropping the connection mid-body (cut_after)."""
        data, status, total = f.data, 200, len(f.data)
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes", **headers}
        rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "").strip())
        start = 0
        if rng and not f.ignore_range:
            start = int(rng[1])
            end = min(int(rng[2]), total - 1) if rng[2] else total - 1
            if start >= total or end < start:
                return self._reply(416, b"", {"Content-Range": f"bytes */{total}"})
            data, status = data[start:end + 1], 206
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        if f.ignore_range:
            headers.pop("Accept-Ranges")
        stall = self.hub._take_stall(repo_id, filename, start) if self.command == "GET" else None
        if stall is not None:
            return self._stall(status, data, headers, *stall)
        cut = self.hub._take_cut(repo_id, filename, start) if self.command == "GET" else None
        if cut is None:
            return self._reply(status, data, headers)
        # A dropped connection: full headers, then part of the body, then FIN. The client sees a short read.
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data[:cut])
        self.wfile.flush()
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _stall(self, status: int, data: bytes, headers: dict[str, str], n_bytes: int,
               resume: threading.Event | None) -> None:
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data[:n_bytes])
        self.wfile.flush()
        deadline = time.monotonic() + 60
        while not self.hub._release.is_set() and not (resume and resume.is_set()) and time.monotonic() < deadline:
            self.hub._release.wait(0.05)
        if resume is not None and resume.is_set() and not self.hub._release.is_set():
            try:
                self.wfile.write(data[n_bytes:])
                return
            except OSError:  # the client went away while paused (interrupted)
                pass
        self.close_connection = True

    # -- a plain web server --------------------------------------------------------------------------------------------
    def _plain(self, path: str) -> None:
        f = self.hub.plain.get(path)
        if f is None:
            return self._reply(404, b"404 Not Found", {"Content-Type": "text/plain"})
        self._send_file(f, "", path[len("/files/"):], {"ETag": f'"{f.sha256}"'})

    # -- Hugging Face ------------------------------------------------------------------------------------------------
    def _hf_error(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        # huggingface_hub maps errors from these headers (utils/_http.py hf_raise_for_status), not from the status:
        # X-Error-Code RepoNotFound -> RepositoryNotFoundError, EntryNotFound -> RemoteEntryNotFoundError,
        # RevisionNotFound -> RevisionNotFoundError. HEAD responses have no body, so headers are all it gets.
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        if commit:
            headers["X-Repo-Commit"] = commit  # lets the client cache the file's non-existence, as on the real Hub
        self._json(status, {"error": message}, headers)

    def _hf_files(self, repo_id: str, revision: str) -> dict[str, _File] | None:
        """Files of the revision, or None after sending the 401/404 the real Hub would send."""
        auth = self._auth(repo_id)
        if auth == "missing":  # the real Hub hides private repos: 401 + RepoNotFound
            return self._hf_error(401, "RepoNotFound", "Invalid username or password.")
        if auth == "wrong":  # huggingface_hub special-cases this exact message (plain HfHubHTTPError 401)
            return self._hf_error(401, None, "Invalid credentials in Authorization header")
        files = self.hub._files(repo_id, revision, "hf")
        if not self.hub._has_repo(repo_id, "hf"):
            return self._hf_error(404, "RepoNotFound", "Repository not found")
        if files is None:
            return self._hf_error(404, "RevisionNotFound", "Invalid rev id: " + revision)
        return files

    def _hf_info(self, repo_id: str, revision: str) -> None:
        if (files := self._hf_files(repo_id, revision)) is None:
            return
        commit = self.hub.commit(repo_id, revision)
        siblings = [{"rfilename": fn, "size": len(f.data), "blobId": f.sha256[:40],
                     "lfs": {"size": len(f.data), "sha256": f.sha256, "pointerSize": 134}}
                    for fn, f in sorted(files.items())]
        self._json(200, {"id": repo_id, "modelId": repo_id, "sha": commit, "private": repo_id in self.hub.tokens,
                         "tags": ["gguf"], "siblings": siblings})

    def _hf_tree(self, repo_id: str, revision: str, prefix: str | None) -> None:
        # Always recursive (a flat listing of every file under `prefix`) plus the folders above them.
        if (files := self._hf_files(repo_id, revision)) is None:
            return
        prefix = (prefix or "").strip("/")
        entries, folders = [], set()
        for fn, f in sorted(files.items()):
            if prefix and not fn.startswith(prefix + "/"):
                continue
            parts = fn.split("/")
            folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
            entries.append({"type": "file", "oid": f.sha256[:40], "size": len(f.data), "path": fn,
                            "lfs": {"oid": f.sha256, "size": len(f.data), "pointerSize": 134}})
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d}
                    for d in sorted(folders) if not prefix or d.startswith(prefix + "/")]
        self._json(200, entries)

    def _hf_resolve(self, repo_id: str, revision: str, filename: str) -> None:
        if (files := self._hf_files(repo_id, revision)) is None:
            return
        commit = self.hub.commit(repo_id, revision)
        if filename not in files:
            return self._hf_error(404, "EntryNotFound", f"{filename} does not exist on {revision}", commit)
        f = files[filename]
        # Answer directly with 200 (no CDN redirect) and without any X-Xet-* header, so the client takes its plain
        # HTTP path. X-Repo-Commit and ETag are mandatory for hf_hub_download; X-Linked-* mirror an LFS file.
        self._send_file(f, repo_id, filename, {
            "X-Repo-Commit": commit, "ETag": f'"{f.sha256}"',
            "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(len(f.data)),
        })

    # -- ModelScope -------------------------------------------------------------------------------------------------
    def _ms_error(self, status: int, message: str) -> None:
        # modelscope_hub.errors.raise_for_status maps 401 -> AuthenticationError, 404 -> NotExistError.
        self._json(status, {"Code": status, "Message": message, "Success": False, "RequestId": "fake"})

    def _ms(self, repo_id: str, what: str, query: dict[str, str]) -> None:
        auth = self._auth(repo_id)
        if auth != "ok":
            return self._ms_error(401, "Unauthorized: invalid or missing access token")
        if not self.hub._has_repo(repo_id, "ms"):
            return self._ms_error(404, f"Model {repo_id} does not exist")
        if what == "revisions":
            names = sorted({"master" if r == "main" else r for r in self.hub.repos[repo_id]})
            branches = [{"Revision": r, "CreatedAt": 1700000000} for r in names]
            return self._json(200, {"Code": 200, "Success": True,
                                    "Data": {"RevisionMap": {"Branches": branches, "Tags": []}}})
        revision = query.get("Revision", "master")
        files = self.hub._files(repo_id, revision, "ms")
        if files is None:
            return self._ms_error(404, f"Revision {revision} of {repo_id} does not exist")
        if what == "repo/files":
            root = query.get("Root", "").strip("/")
            listing = [{"Name": fn.rsplit("/", 1)[-1], "Path": fn, "Type": "blob", "Size": len(f.data),
                        "Sha256": f.sha256, "IsLFS": True, "Revision": self.hub.commit(repo_id, revision)}
                       for fn, f in sorted(files.items()) if not root or fn.startswith(root + "/")]
            return self._json(200, {"Code": 200, "Success": True, "Data": {"Files": listing}})
        filename = query.get("FilePath", "")
        if filename not in files:
            return self._ms_error(404, f"File {filename} does not exist")
        f = files[filename]
        self._send_file(f, repo_id, filename, {"X-Linked-ETag": f.sha256} if self.hub.ms_linked_etag else {})
