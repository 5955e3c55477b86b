"""A Hugging Face Hub on loopback for tests (point HF_ENDPOINT at `FakeHub.url`): the file API huggingface_hub
uses to resolve and fetch a repo (revision info, tree listing, HEAD and GET of a file under /resolve/, a GET
with a `Range: bytes=A-B` header answered 206 with those bytes), serving local directories as repos, counting
every request and the bytes of each file it sent. And a Hub cache laid out in a directory as huggingface_hub
lays it out (refs, snapshots, blobs), for offline tests."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse


def commit_of(repo_id: str, folder: Path) -> str:
    return hashlib.sha1(f"{repo_id}|{folder}".encode()).hexdigest()


def _blob_id(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


class FakeHub:
    """`repos`: repo id -> revision name (a branch or tag) -> the directory it holds; `gated`: repo ids that
    answer 401 GatedRepo. Commits are derived from (repo, directory); a commit hash names its revision too."""

    def __init__(self, repos: dict[str, dict[str, Path]], gated: frozenset[str] = frozenset()) -> None:
        self.repos, self.gated = repos, gated
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.full_gets: list[str] = []  # files sent whole (a GET without Range)
        self.bytes_sent: dict[str, int] = {}  # file -> bytes of it sent in bodies, ranges included
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub._answer(self, body=True)

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    def downloads(self) -> list[str]:
        """The files fetched whole (GET under /resolve/ without a Range), by name."""
        with self._lock:
            return sorted(self.full_gets)

    # --- the Hub's answers ------------------------------------------------------------------------
    def _folder(self, repo_id: str, revision: str) -> Path | None:
        for name, folder in self.repos.get(repo_id, {}).items():
            if revision in (name, commit_of(repo_id, folder)):
                return folder
        return None

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(handler.path).path)
        with self._lock:
            self.requests.append((handler.command, path))
        if path.startswith("/api/models/"):
            org, name, kind, revision, *_ = path[len("/api/models/"):].split("/") + [""] * 4
            self._api(handler, f"{org}/{name}", kind, revision)
        elif "/resolve/" in path:
            repo_id, _, rest = path.strip("/").partition("/resolve/")
            revision, _, filename = rest.partition("/")
            self._file(handler, repo_id, revision, filename, body)
        else:
            self._send(handler, 404, b"", {"X-Error-Code": "RepoNotFound"})

    def _refused(self, handler: BaseHTTPRequestHandler, repo_id: str, revision: str) -> Path | None:
        if repo_id in self.gated:
            self._send(handler, 401, b'{"error": "gated"}', {"X-Error-Code": "GatedRepo"})
        elif repo_id not in self.repos:
            self._send(handler, 401, b'{"error": "not found"}', {"X-Error-Code": "RepoNotFound"})
        elif (folder := self._folder(repo_id, revision)) is None:
            self._send(handler, 404, b'{"error": "revision"}', {"X-Error-Code": "RevisionNotFound"})
        else:
            return folder
        return None

    def _api(self, handler: BaseHTTPRequestHandler, repo_id: str, kind: str, revision: str) -> None:
        folder = self._refused(handler, repo_id, revision)
        if folder is None:
            return
        files = sorted(f for f in folder.iterdir() if f.is_file())
        if kind == "revision":
            info = {"id": repo_id, "modelId": repo_id, "sha": commit_of(repo_id, folder), "private": False,
                    "gated": False, "siblings": [{"rfilename": f.name} for f in files]}
            self._send(handler, 200, json.dumps(info).encode(), {"Content-Type": "application/json"})
        else:  # tree
            tree = [{"type": "file", "path": f.name, "size": f.stat().st_size, "oid": _blob_id(f.read_bytes())}
                    for f in files]
            self._send(handler, 200, json.dumps(tree).encode(), {"Content-Type": "application/json"})

    def _file(self, handler: BaseHTTPRequestHandler, repo_id: str, revision: str, filename: str, body: bool) -> None:
        folder = self._refused(handler, repo_id, revision)
        if folder is None:
            return
        commit = commit_of(repo_id, folder)
        file = folder / filename
        if not file.is_file():
            self._send(handler, 404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
            return
        data = file.read_bytes()
        headers = {"X-Repo-Commit": commit, "ETag": f'"{_blob_id(data)}"', "Content-Type": "application/octet-stream"}
        ranged = re.fullmatch(r"bytes=(\d+)-(\d+)", handler.headers.get("Range", "").strip())
        status, part = 200, data
        if ranged and body:
            start, stop = int(ranged[1]), min(int(ranged[2]) + 1, len(data))
            status, part = 206, data[start:stop]
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
        if body:
            with self._lock:
                self.bytes_sent[filename] = self.bytes_sent.get(filename, 0) + len(part)
                if not ranged:
                    self.full_gets.append(filename)
        self._send(handler, status, part if body else b"", headers, length=len(part))

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str],
              length: int | None = None) -> None:
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data) if length is None else length))
        handler.end_headers()
        if data and handler.command != "HEAD":
            handler.wfile.write(data)


def lay_out_cache(cache: Path, repo_id: str, refs: dict[str, Path], skip: tuple[str, ...] = ()) -> dict[str, str]:
    """A Hub cache (HF_HUB_CACHE) holding `repo_id` as huggingface_hub lays it out: blobs/ (by content),
    snapshots/COMMIT/FILE (symlinks into blobs), refs/NAME (the commit). `refs`: ref name -> directory; files
    named in `skip` are left out (a partial download). Returns ref name -> commit."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    commits: dict[str, str] = {}
    for ref, folder in refs.items():
        commit = commit_of(repo_id, folder)
        snapshot = storage / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        for file in sorted(folder.iterdir()):
            if not file.is_file() or file.name in skip:
                continue
            blob = storage / "blobs" / _blob_id(file.read_bytes())
            blob.parent.mkdir(parents=True, exist_ok=True)
            if not blob.exists():
                shutil.copyfile(file, blob)
            link = snapshot / file.name
            if not link.exists():
                link.symlink_to(Path("../../blobs") / blob.name)
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
        commits[ref] = commit
    return commits
