"""A minimal stand-in for the Hugging Face Hub's HTTP API, serving local folders as model repos, so that
huggingface_hub itself downloads them and lays out its cache (no network here). It answers what
snapshot_download and hf_hub_download ask: the revision info, the recursive tree listing and
HEAD/GET of /{repo}/resolve/{commit}/{file}."""
from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self, repos: dict[str, Path]):
        self.repos = {name: Path(path) for name, path in repos.items()}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.answer(self, body=False)

            def do_GET(self):
                hub.answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _files(self, repo: str) -> list[Path]:
        root = self.repos[repo]
        return sorted(p for p in root.rglob("*") if p.is_file())

    def answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.requests.append(f"{h.command} {path}")
        for repo, root in self.repos.items():
            if path.startswith(f"/api/models/{repo}/revision/"):
                files = [{"rfilename": str(p.relative_to(root))} for p in self._files(repo)]
                return self._json(h, {"id": repo, "modelId": repo, "sha": COMMIT, "siblings": files, "private": False}, body)
            if path.startswith(f"/api/models/{repo}/tree/"):
                entries = [{"type": "file", "path": str(p.relative_to(root)), "size": p.stat().st_size,
                            "oid": _git_blob_id(p.read_bytes())} for p in self._files(repo)]
                return self._json(h, entries, body)
            prefix = f"/{repo}/resolve/"
            if path.startswith(prefix):
                _, _, name = path[len(prefix):].partition("/")
                file = root / name
                if not file.is_file():
                    return self._send(h, 404, b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound"}, body)
                data = file.read_bytes()
                return self._send(h, 200, data, {"X-Repo-Commit": COMMIT, "ETag": f'"{_git_blob_id(data)}"',
                                                  "Content-Type": "application/octet-stream"}, body)
        self._send(h, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, body)

    def _json(self, h, obj, body: bool) -> None:
        self._send(h, 200, json.dumps(obj).encode(), {"Content-Type": "application/json"}, body)

    @staticmethod
    def _send(h, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)
