"""A stand-in for the Hugging Face Hub on 127.0.0.1: just the requests huggingface_hub makes to list a
dataset repository and download its files, so that `storygpt data download` is tested end to end
without the network (HF_ENDPOINT points at it).

    GET  /api/datasets/{repo}/revision/{rev}?blobs=true   repo info: commit, files with size / blob id / LFS sha256
    HEAD /datasets/{repo}/resolve/{rev}/{file}            302 to {cdn}/cdn/{sha256} with X-Repo-Commit, X-Linked-Etag,
                                                          X-Linked-Size (what the Hub answers for LFS files)
    GET  /datasets/{repo}/resolve/{rev}/{file}            the same redirect
    GET  /cdn/{sha256}                                    the bytes; honours `Range: bytes=N-`

The bytes are served on a second port: like the Hub's CDN, another origin, so that huggingface_hub
takes the file's metadata from the redirect and does not follow it with its HEAD request.

Every request is recorded (method, path, Range header). `cut[filename] = n` makes the first download
of that file stop after n bytes of its body and drop the connection, as a flaky network would.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, bytes]], listed_sha256: dict[str, str] | None = None):
        """repos: {"owner/name": {filename: content}}; listed_sha256 overrides the checksum listed for a file."""
        self.repos = repos
        self.listed_sha256 = listed_sha256 or {}
        self.blobs = {hashlib.sha256(c).hexdigest(): c for files in repos.values() for c in files.values()}
        self.requests: list[tuple[str, str, str | None]] = []
        self.cut: dict[str, int] = {}
        self._servers = [ThreadingHTTPServer(("127.0.0.1", 0), self._handler()) for _ in ("hub", "cdn")]
        for server in self._servers:
            server.daemon_threads = True
        self.url, self.cdn_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in self._servers)

    def __enter__(self) -> Self:
        for server in self._servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def sha256(self, repo: str, name: str) -> str:
        return self.listed_sha256.get(name) or hashlib.sha256(self.repos[repo][name]).hexdigest()

    def content_gets(self) -> list[tuple[str, str | None]]:
        """(path, Range header) of every GET of file bytes."""
        return [(path, rng) for method, path, rng in self.requests if method == "GET" and path.startswith("/cdn/")]

    # --- the HTTP side -------------------------------------------------------------------------
    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                self._route(head=True)

            def do_GET(self):
                self._route(head=False)

            def _route(self, head: bool):
                path = urlsplit(self.path).path
                hub.requests.append((self.command, path, self.headers.get("Range")))
                if m := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/revision/([^/]+)", path):
                    return self._info(m[1])
                if m := re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                    return self._resolve(m[1], unquote(m[3]), head)
                if m := re.fullmatch(r"/cdn/([0-9a-f]{64})", path):
                    return self._blob(m[1], head)
                self._send(404, b"not found", {"X-Error-Code": "EntryNotFound"}, head)

            def _info(self, repo: str):
                if repo not in hub.repos:
                    return self._send(404, b"{}", {"X-Error-Code": "RepoNotFound"})
                siblings = [{"rfilename": name, "size": len(content),
                             "blobId": hashlib.sha1(f"blob {len(content)}\0".encode() + content).hexdigest(),
                             "lfs": {"sha256": hub.sha256(repo, name), "size": len(content), "pointerSize": 134}}
                            for name, content in hub.repos[repo].items()]
                body = json.dumps({"id": repo, "sha": COMMIT, "private": False, "siblings": siblings}).encode()
                self._send(200, body, {"Content-Type": "application/json"})

            def _resolve(self, repo: str, name: str, head: bool):
                if repo not in hub.repos:
                    return self._send(404, b"", {"X-Error-Code": "RepoNotFound"}, head)
                if name not in hub.repos[repo]:
                    return self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}, head)
                content = hub.repos[repo][name]
                real = hashlib.sha256(content).hexdigest()
                self._send(302, b"", {"Location": f"{hub.cdn_url}/cdn/{real}", "X-Repo-Commit": COMMIT,
                                      "X-Linked-Etag": f'"{hub.sha256(repo, name)}"',
                                      "X-Linked-Size": str(len(content)), "ETag": f'"{real[:40]}"'}, head)

            def _blob(self, sha: str, head: bool):
                content = hub.blobs.get(sha)
                if content is None:
                    return self._send(404, b"", {}, head)
                start = 0
                if m := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or ""):
                    start = int(m[1])
                headers = {"Accept-Ranges": "bytes", "ETag": f'"{sha}"'}
                if start:
                    headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
                name = next((n for files in hub.repos.values() for n, c in files.items() if c is content), "")
                cut = hub.cut.pop(name, None) if not head else None
                body = content[start:]
                if cut is None:
                    return self._send(206 if start else 200, body, headers, head)
                # a connection that drops after `cut` bytes of a body announced in full
                self.send_response(206 if start else 200)
                for k, v in {**headers, "Content-Length": str(len(body)), "Connection": "close"}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True

            def _send(self, status: int, body: bytes, headers: dict, head: bool = False):
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

        return Handler
