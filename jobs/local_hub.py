"""
A real HTTP server on 127.0.0.1 that answers what huggingface_hub asks the hub for a dataset (point
HF_ENDPOINT at it), and serves plain files beside (a zip published outside the hub). The rehearsal
(jobs/commands/rehearse.py) and the tests put files in it; nothing else of the hub is imitated.

    GET  /api/datasets/<owner>/<name>/revision/<rev>        the commit a revision names
    GET  /api/datasets/<owner>/<name>/tree/<rev>/<folder>   the folder's files (size, git oid, LFS sha256)
    POST /api/datasets/<owner>/<name>/paths-info/<rev>      the same for named paths
    HEAD /datasets/<owner>/<name>/resolve/<rev>/<path>      X-Repo-Commit, ETag, Content-Length
    GET  the same, or /<path> of a plain file               the bytes, honouring `Range: bytes=N-`

Each repository has one commit (`commits`); a revision that is neither it nor "main" is answered
404 RevisionNotFound, as the hub answers an unknown one, so a client that asks for another commit
than it pinned fails here as it would there. Parquet files are listed as LFS files (sha256), the
others by their git blob sha1, as the hub lists them.
Faults are queued per file and consumed one per GET:
    "500"      an HTTP 500 instead of the file
    "cut"      the full Content-Length announced, half the body sent, then the connection closed
    "truncate" a complete response whose body is only the first half of the file
    "corrupt"  the right size, wrong bytes (the checksum cannot match)
A fault name ending in "!" is never consumed (it happens on every attempt).
"""
from __future__ import annotations

import hashlib
import json
import threading
import urllib.parse
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def default_commit(repo_id: str) -> str:
    return hashlib.sha1(f"local-hub:{repo_id}".encode()).hexdigest()


class LocalHub:
    def __init__(self):
        self.files: dict[tuple[str, str], bytes] = {}     # (repo_id, path) -> content; repo_id "" = a plain file
        self.commits: dict[str, str] = {}                  # repo_id -> its one commit
        self.faults: dict[tuple[str, str], list[str]] = defaultdict(list)
        self.api_faults: list[str] = []                    # "500" answers to the next API requests
        self.requests: list[tuple[str, str]] = []         # (method, path) of every request
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, repo_id: str, path: str, content: bytes, faults: list[str] | None = None,
            commit: str = "") -> None:
        self.files[(repo_id, path)] = content
        self.faults[(repo_id, path)] = list(faults or [])
        self.commits[repo_id] = commit or self.commits.get(repo_id) or default_commit(repo_id)

    def add_url(self, path: str, content: bytes, faults: list[str] | None = None) -> str:
        """A plain file at <endpoint>/<path>; returns its URL."""
        path = path.lstrip("/")
        self.files[("", path)] = content
        self.faults[("", path)] = list(faults or [])
        return f"{self.endpoint}/{path}"

    def start(self) -> "LocalHub":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _next_fault(self, key) -> str:
        with self.lock:
            queue = self.faults.get(key) or []
            if not queue:
                return ""
            if queue[0].endswith("!"):
                return queue[0][:-1]
            return queue.pop(0)

    def _known_revision(self, repo_id: str, rev: str) -> bool:
        return repo_id in self.commits and rev in ("main", self.commits[repo_id])

    def _entry(self, repo_id: str, path: str) -> dict:
        content = self.files[(repo_id, path)]
        git_sha1 = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
        entry = {"type": "file", "path": path, "size": len(content), "oid": git_sha1}
        if path.endswith(".parquet"):  # LFS on the hub: the listed checksum is sha256
            entry["lfs"] = {"size": len(content), "oid": hashlib.sha256(content).hexdigest(), "pointerSize": 134}
        return entry

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):
                pass

            def _record(self):
                with hub.lock:
                    hub.requests.append((self.command, urllib.parse.unquote(self.path)))

            def _parts(self) -> list[str]:
                return urllib.parse.unquote(urllib.parse.urlparse(self.path).path).lstrip("/").split("/")

            def _json(self, obj, status: int = 200):
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _error(self, status: int, code: str = "", message: str = "not found"):
                body = json.dumps({"error": message}).encode()
                self.send_response(status)
                if code:
                    self.send_header("X-Error-Code", code)
                    self.send_header("X-Error-Message", message)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _api_fault(self) -> bool:
                with hub.lock:
                    fault = hub.api_faults.pop(0) if hub.api_faults else ""
                if fault == "500":
                    self._error(500, message="internal error")
                    return True
                return False

            def _resolve(self):
                """(key, content, error sent) of a file GET/HEAD."""
                parts = self._parts()
                # datasets/<owner>/<name>/resolve/<rev>/<path...>
                if len(parts) >= 6 and parts[0] == "datasets" and parts[3] == "resolve":
                    repo, rev, key = f"{parts[1]}/{parts[2]}", parts[4], (f"{parts[1]}/{parts[2]}", "/".join(parts[5:]))
                    if repo not in hub.commits:
                        self._error(404, "RepoNotFound", f"repository {repo} not found")
                        return None, None, True
                    if not hub._known_revision(repo, rev):
                        self._error(404, "RevisionNotFound", f"revision {rev} not found")
                        return None, None, True
                    if key not in hub.files:
                        self._error(404, "EntryNotFound", f"{key[1]} not found")
                        return None, None, True
                    return key, hub.files[key], False
                key = ("", "/".join(parts))
                if key not in hub.files:
                    self._error(404)
                    return None, None, True
                return key, hub.files[key], False

            def _headers(self, key, content: bytes, length: int, status: int = 200, extra: dict | None = None):
                self.send_response(status)
                self.send_header("Content-Length", str(length))
                if key[0]:
                    self.send_header("X-Repo-Commit", hub.commits[key[0]])
                self.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
                self.send_header("Accept-Ranges", "bytes")
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()

            def do_HEAD(self):
                self._record()
                key, content, sent = self._resolve()
                if not sent:
                    self._headers(key, content, len(content))

            def do_GET(self):
                self._record()
                parts = self._parts()
                if parts[:2] == ["api", "datasets"]:
                    return self._api_get(parts)
                key, content, sent = self._resolve()
                if sent:
                    return
                fault = hub._next_fault(key)
                if fault == "500":
                    self._error(500, message="internal error")
                    return
                start = 0
                rng = self.headers.get("Range", "")
                if rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0] or 0)
                body = content[start:]
                status = 206 if start else 200
                extra = {"Content-Range": f"bytes {start}-{len(content) - 1}/{len(content)}"} if start else {}
                if fault == "corrupt":
                    body = bytes(b ^ 0x5A for b in body[:64]) + body[64:]
                if fault == "truncate":
                    body = body[: len(body) // 2]
                    self._headers(key, content, len(body), status, extra)
                    self.wfile.write(body)
                    return
                self._headers(key, content, len(body), status, extra)
                if fault == "cut":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def _api_repo(self, parts, actions) -> str | None:
                """The repository of api/datasets/<owner>/<name>/<action>/<rev>..., or None once an
                error (a fault, an unknown repository or revision) was sent."""
                if len(parts) < 6 or parts[:2] != ["api", "datasets"] or parts[4] not in actions:
                    return self._error(404)
                if self._api_fault():
                    return None
                repo, rev = f"{parts[2]}/{parts[3]}", parts[5]
                if repo not in hub.commits:
                    return self._error(404, "RepoNotFound", f"repository {repo} not found")
                if not hub._known_revision(repo, rev):
                    return self._error(404, "RevisionNotFound", f"revision {rev} not found")
                return repo

            def _api_get(self, parts):
                # api/datasets/<owner>/<name>/(revision|tree)/<rev>[/<folder...>]
                repo = self._api_repo(parts, ("revision", "tree"))
                if repo is None:
                    return
                if parts[4] == "revision":
                    return self._json({"id": repo, "sha": hub.commits[repo], "private": False, "siblings": [
                        {"rfilename": p} for (r, p) in sorted(hub.files) if r == repo]})
                folder = "/".join(parts[6:]).strip("/")
                prefix = f"{folder}/" if folder else ""
                entries, dirs = [], set()
                for (r, p) in sorted(hub.files):
                    if r != repo or not p.startswith(prefix):
                        continue
                    rest = p[len(prefix):]
                    if "/" in rest:
                        dirs.add(prefix + rest.split("/")[0])
                    else:
                        entries.append(hub._entry(repo, p))
                if not entries and not dirs:
                    return self._error(404, "EntryNotFound", f"{folder} not found")
                folders = [{"type": "directory", "path": d, "oid": "0" * 40, "size": 0} for d in sorted(dirs)]
                self._json(folders + entries)

            def do_POST(self):
                self._record()
                # api/datasets/<owner>/<name>/paths-info/<rev>
                repo = self._api_repo(self._parts(), ("paths-info",))
                if repo is None:
                    return
                length = int(self.headers.get("Content-Length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                self._json([hub._entry(repo, p) for p in form.get("paths", []) if (repo, p) in hub.files])

        return Handler
