"""
A real HTTP server on 127.0.0.1 that answers what huggingface_hub asks the hub for a dataset file
(point HF_ENDPOINT at it):
    POST /api/datasets/<owner>/<name>/paths-info/<rev>    sizes and checksums (LFS sha256, git blob sha1)
    HEAD /datasets/<owner>/<name>/resolve/<rev>/<path>     X-Repo-Commit, ETag, Content-Length
    GET  the same                                          the bytes, honouring `Range: bytes=N-`
Faults are queued per file and consumed one per GET:
    "500"      an HTTP 500 instead of the file
    "cut"      the full Content-Length announced, half the body sent, then the connection closed
    "truncate" a complete response whose body is only the first half of the file
    "corrupt"  the right size, wrong bytes (the checksum cannot match)
A fault name ending in "!" is never consumed (it happens on every attempt).
"""
from __future__ import annotations

import hashlib
import threading
import urllib.parse
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self):
        self.files: dict[tuple[str, str], bytes] = {}     # (repo_id, path) -> content
        self.faults: dict[tuple[str, str], list[str]] = defaultdict(list)
        self.api_faults: list[str] = []                    # "500" answers to the next paths-info requests
        self.requests: list[tuple[str, str]] = []         # (method, path) of every request
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, repo_id: str, path: str, content: bytes, faults: list[str] | None = None) -> None:
        self.files[(repo_id, path)] = content
        self.faults[(repo_id, path)] = list(faults or [])

    def start(self) -> "FakeHub":
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

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):
                pass

            def _record(self):
                with hub.lock:
                    hub.requests.append((self.command, urllib.parse.unquote(self.path)))

            def _resolve(self):
                parts = urllib.parse.unquote(urllib.parse.urlparse(self.path).path).lstrip("/").split("/")
                # datasets/<owner>/<name>/resolve/<rev>/<path...>
                if len(parts) < 6 or parts[0] != "datasets" or parts[3] != "resolve":
                    return None, None
                key = (f"{parts[1]}/{parts[2]}", "/".join(parts[5:]))
                return key, hub.files.get(key)

            def _headers(self, content: bytes, length: int, status: int = 200, extra: dict | None = None):
                self.send_response(status)
                self.send_header("Content-Length", str(length))
                self.send_header("X-Repo-Commit", "0" * 40)
                self.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
                self.send_header("Accept-Ranges", "bytes")
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()

            def do_HEAD(self):
                self._record()
                key, content = self._resolve()
                if content is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self._headers(content, len(content))

            def do_GET(self):
                self._record()
                key, content = self._resolve()
                if content is None:
                    self.send_error(404)
                    return
                fault = hub._next_fault(key)
                if fault == "500":
                    body = b"internal error"
                    self.send_response(500)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
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
                    self._headers(content, len(body), status, extra)
                    self.wfile.write(body)
                    return
                self._headers(content, len(body), status, extra)
                if fault == "cut":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def do_POST(self):
                self._record()
                parts = urllib.parse.unquote(urllib.parse.urlparse(self.path).path).lstrip("/").split("/")
                # api/datasets/<owner>/<name>/paths-info/<rev>
                if len(parts) < 6 or parts[:2] != ["api", "datasets"] or parts[4] != "paths-info":
                    self.send_error(404)
                    return
                repo = f"{parts[2]}/{parts[3]}"
                with hub.lock:
                    fault = hub.api_faults.pop(0) if hub.api_faults else ""
                if fault == "500":
                    self.send_error(500)
                    return
                length = int(self.headers.get("Content-Length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                out = []
                for p in form.get("paths", []):
                    content = hub.files.get((repo, p))
                    if content is None:
                        continue
                    git_sha1 = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
                    entry = {"type": "file", "path": p, "size": len(content), "oid": git_sha1}
                    if p.endswith(".parquet"):  # LFS on the hub: the listed checksum is sha256
                        entry["lfs"] = {"size": len(content), "oid": hashlib.sha256(content).hexdigest(),
                                        "pointerSize": 134}
                    out.append(entry)
                import json
                body = json.dumps(out).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler
