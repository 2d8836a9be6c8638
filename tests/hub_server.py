"""A loopback Hub: a stdlib HTTP server on 127.0.0.1 that speaks the subset of the Hugging Face Hub API used by the
real huggingface_hub client (create repo, preupload, NDJSON commits, repo info, tree, paths-info, resolve).

Repositories live in memory as a list of commits (full snapshots). Uploads are answered in "regular" mode (file
bytes inline in the commit), which the real client supports for any file. `fail_next(n)` answers the next n
requests with 503 and `down = True` answers every request with 503, to test retries and outages.
"""

import base64
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

REPO = r"(?P<repo>[^/]+/[^/]+)"
REV = r"(?P<rev>[^/]+)"


class HubState:
    def __init__(self):
        self.repos: dict[str, list[tuple[str, dict[str, bytes]]]] = {}  # repo -> [(sha, files)]
        self.private: dict[str, bool] = {}
        self.lock = threading.Lock()
        self.failures_left = 0
        self.down = False
        self.stalled = threading.Event()  # set: accept requests and never answer them (until cleared, or 120 s)
        self.requests: list[str] = []

    def fail_next(self, count: int) -> None:
        self.failures_left = count

    def snapshot(self, repo: str, rev: str) -> tuple[str, dict[str, bytes]] | None:
        history = self.repos.get(repo)
        if not history:
            return None
        if rev in ("main", "HEAD"):
            return history[-1]
        for sha, files in history:
            if sha == rev:
                return sha, files
        return None

    def commit(self, repo: str, changes: dict[str, bytes | None], message: str) -> str:
        with self.lock:
            history = self.repos[repo]
            files = dict(history[-1][1]) if history else {}
            for path, content in changes.items():
                if content is None:
                    files = {p: c for p, c in files.items() if p != path and not p.startswith(path.rstrip("/") + "/")}
                else:
                    files[path] = content
            sha = hashlib.sha1(f"{repo}{len(history)}{message}".encode() + repr(sorted(files)).encode()).hexdigest()
            history.append((sha, files))
            return sha


def git_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def make_handler(state: HubState):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output quiet
            pass

        def reply(self, status: int, body=None, headers: dict | None = None, head: bool = False):
            data = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            if not isinstance(body, bytes):
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not head:
                self.wfile.write(data)

        def not_found(self, code: str, head: bool = False):
            self.reply(404, {"error": code}, {"X-Error-Code": code, "X-Error-Message": code}, head=head)

        def body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def intercepted(self) -> bool:
            state.requests.append(f"{self.command} {self.path}")
            deadline = time.monotonic() + 120
            while state.stalled.is_set() and time.monotonic() < deadline:
                time.sleep(0.05)
            if state.down or state.failures_left > 0:
                state.failures_left = max(0, state.failures_left - 1)
                self.reply(503, {"error": "loopback Hub unavailable"})
                return True
            return False

        # -- routing ------------------------------------------------------------------------------------------

        def do_HEAD(self):
            self.do_GET(head=True)

        def do_GET(self, head: bool = False):
            if self.intercepted():
                return
            path = unquote(urlparse(self.path).path)
            if path == "/api/whoami-v2":
                return self.reply(200, {"type": "user", "name": "tester", "auth": {"accessToken": {"role": "write"}}})
            if m := re.fullmatch(rf"/api/models/{REPO}(?:/revision/{REV})?", path):
                return self.repo_info(m["repo"], m["rev"] or "main")
            if m := re.fullmatch(rf"/api/models/{REPO}/tree/{REV}(?:/(?P<sub>.*))?", path):
                return self.tree(m["repo"], m["rev"], m["sub"] or "")
            if m := re.fullmatch(rf"/{REPO}/resolve/{REV}/(?P<file>.+)", path):
                return self.resolve(m["repo"], m["rev"], m["file"], head)
            self.not_found("EntryNotFound", head)

        def do_POST(self):
            raw = self.body()  # read first, so a refused request leaves the connection usable
            if self.intercepted():
                return
            path = unquote(urlparse(self.path).path)
            if path == "/api/repos/create":
                return self.create_repo(json.loads(raw))
            if path == "/api/validate-yaml":
                return self.reply(200, {"errors": [], "warnings": []})
            if m := re.fullmatch(rf"/api/models/{REPO}/preupload/{REV}", path):
                files = json.loads(raw)["files"]
                return self.reply(
                    200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
                )
            if m := re.fullmatch(rf"/api/models/{REPO}/commit/{REV}", path):
                return self.commit(m["repo"], raw)
            if m := re.fullmatch(rf"/api/models/{REPO}/paths-info/{REV}", path):
                return self.paths_info(m["repo"], m["rev"], raw)
            self.not_found("EntryNotFound")

        # -- endpoints ----------------------------------------------------------------------------------------

        def create_repo(self, payload: dict):
            repo = f"{payload.get('organization') or 'tester'}/{payload['name']}"
            with state.lock:
                if repo in state.repos:
                    return self.reply(409, {"error": "You already created this model repo", "url": self.url(repo)})
                state.repos[repo] = []
                state.private[repo] = bool(payload.get("private"))
            self.reply(200, {"url": self.url(repo), "name": repo, "id": repo})

        def url(self, repo: str) -> str:
            return f"http://{self.headers['Host']}/{repo}"

        def commit(self, repo: str, raw: bytes):
            if repo not in state.repos:
                return self.not_found("RepoNotFound")
            lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
            message = next((line["value"]["summary"] for line in lines if line["key"] == "header"), "")
            changes = {}
            for line in lines:
                if line["key"] == "file":
                    changes[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                elif line["key"] in ("deletedFile", "deletedFolder"):
                    changes[line["value"]["path"]] = None
            sha = state.commit(repo, changes, message)
            self.reply(200, {"commitUrl": f"{self.url(repo)}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})

        def entry(self, path: str, content: bytes) -> dict:
            return {"type": "file", "path": path, "size": len(content), "oid": git_oid(content)}

        def repo_info(self, repo: str, rev: str):
            found = state.snapshot(repo, rev)
            if repo not in state.repos:
                return self.not_found("RepoNotFound")
            sha, files = found if found else (None, {})
            self.reply(
                200,
                {
                    "id": repo,
                    "modelId": repo,
                    "sha": sha,
                    "private": state.private[repo],
                    "siblings": [{"rfilename": p} for p in sorted(files)],
                    "tags": [],
                    "downloads": 0,
                    "likes": 0,
                },
            )

        def tree(self, repo: str, rev: str, sub: str):
            found = state.snapshot(repo, rev)
            if found is None:
                return self.not_found("RevisionNotFound")
            prefix = sub.rstrip("/") + "/" if sub else ""
            entries = [self.entry(p, c) for p, c in sorted(found[1].items()) if p.startswith(prefix)]
            if sub and not entries:
                return self.not_found("EntryNotFound")
            self.reply(200, entries)

        def paths_info(self, repo: str, rev: str, raw: bytes):
            found = state.snapshot(repo, rev)
            if found is None:
                return self.not_found("RevisionNotFound")
            text = raw.decode()
            paths = (
                json.loads(text)["paths"]
                if text.startswith("{")
                else [unquote(v) for k, v in (p.split("=", 1) for p in text.split("&")) if k == "paths"]
            )
            self.reply(200, [self.entry(p, found[1][p]) for p in paths if p in found[1]])

        def resolve(self, repo: str, rev: str, file: str, head: bool):
            found = state.snapshot(repo, rev)
            if found is None:
                return self.not_found("RevisionNotFound" if repo in state.repos else "RepoNotFound", head)
            sha, files = found
            if file not in files:
                return self.not_found("EntryNotFound", head)
            content = files[file]
            headers = {"X-Repo-Commit": sha, "ETag": f'"{git_oid(content)}"'}
            self.reply(200, content, headers, head=head)

    return Handler


class LoopbackHub:
    """Start with `LoopbackHub()`; `.endpoint` is the URL to put in HF_ENDPOINT; `.stop()` ends it."""

    def __init__(self):
        self.state = HubState()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self.state))
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
