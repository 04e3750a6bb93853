"""A local HTTP server standing in for the Hugging Face Hub (``HF_ENDPOINT``), and a Hub cache built by hand.

Serves what ``huggingface_hub.snapshot_download`` calls: ``GET /api/models/{id}/revision/{rev}`` (commit),
``GET /api/models/{id}/tree/{rev}`` (file list with sizes), ``HEAD`` + ``GET /{id}/resolve/{rev}/{file}`` (ETag,
X-Repo-Commit, sizes; ``Range: bytes=N-`` answered with 206). Errors carry the Hub's ``X-Error-Code`` header
(RepoNotFound, RevisionNotFound, GatedRepo). Every request is logged as (method, path, Range header).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    gated: bool = False
    drop_once: set[str] = field(default_factory=set)  # files whose first GET breaks off halfway


class FakeHub:
    def __init__(self, token: str = "hf_test_token"):
        self.repos: dict[str, Repo] = {}
        self.log: list[tuple[str, str, str | None]] = []
        self.token = token
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._handle(self, head=True)

            def do_GET(self):
                hub._handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def gets(self, name: str) -> list[str | None]:
        """Range headers of the GET requests for file ``name`` (None: the whole file)."""
        return [r for m, p, r in self.log if m == "GET" and p.endswith("/" + name) and "/resolve/" in p]

    # ---- request handling ------------------------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlparse(h.path).path)
        self.log.append(("HEAD" if head else "GET", path, h.headers.get("Range")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 5:
            repo_id, kind, rev = "/".join(parts[2:4]), parts[4], "/".join(parts[5:])
            repo = self._repo(h, repo_id, rev)
            if repo is None:
                return
            if kind == "revision":
                body = {"id": repo_id, "sha": repo.commit, "private": False, "gated": "auto" if repo.gated else False,
                        "siblings": [{"rfilename": n} for n in repo.files]}
            else:  # tree
                body = [{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                        for n, d in sorted(repo.files.items())]
            return self._send(h, 200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, rev, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            repo = self._repo(h, repo_id, rev)
            if repo is None:
                return
            if repo.gated and h.headers.get("Authorization") != f"Bearer {self.token}":
                return self._error(h, 401, "GatedRepo", head)
            if name not in repo.files:
                return self._error(h, 404, "EntryNotFound", head)
            data = repo.files[name]
            headers = {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": repo.commit,
                       "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            start = 0
            if (rng := h.headers.get("Range")) and rng.startswith("bytes="):
                start = int(rng[6:].split("-")[0])
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            if not head and name in repo.drop_once:  # promise the whole file, send half, hang up
                repo.drop_once.discard(name)
                h.send_response(200)
                for k, v in {**headers, "Content-Length": str(len(data))}.items():
                    h.send_header(k, v)
                h.end_headers()
                h.wfile.write(data[: len(data) // 2])
                h.wfile.flush()
                h.close_connection = True
                return
            return self._send(h, 206 if start else 200, data[start:], headers, head)
        self._error(h, 404, None, head)

    def _repo(self, h, repo_id: str, rev: str) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, 401, "RepoNotFound", False)
        elif rev not in ("main", repo.commit):
            self._error(h, 404, "RevisionNotFound", False)
            return None
        return repo

    def _error(self, h, status: int, code: str | None, head: bool) -> None:
        self._send(h, status, b'{"error": "nope"}', {"X-Error-Code": code} if code else {}, head)

    @staticmethod
    def _send(h, status: int, body: bytes, headers: dict, head: bool) -> None:
        h.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            h.send_header(k, v)
        h.end_headers()
        if not head:
            h.wfile.write(body)


def populate_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str, ref: str = "main") -> Path:
    """Write ``files`` into a Hub cache as huggingface_hub lays it out: ``models--ORG--NAME/blobs/<sha256>``, the
    snapshot ``snapshots/<commit>/<file>`` as relative symlinks to the blobs, ``refs/<ref>`` holding the commit."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / ref).write_text(commit)
    return snapshot
