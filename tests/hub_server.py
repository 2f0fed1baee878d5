"""A Hugging Face Hub on 127.0.0.1 for the hf:// tests, reached through ``HF_ENDPOINT`` like a Hub mirror.

It implements the route files are read through, ``/{org}/{repo}/resolve/{revision}/{path}`` (HEAD for the
metadata, GET for the bytes), answering with the headers the Hub sends: ``X-Repo-Commit`` (the commit a revision
resolves to), ``ETag`` (here the file's sha256, so changed bytes get a new one) and ``Content-Length``; with a
``token`` it is a private repository. Files come from ``root`` as they are at request time; every request is logged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

COMMIT = "1f0e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c"


@dataclass
class LocalHub:
    """Serves ``root`` as the repository ``repo_id`` at every revision (each resolving to ``COMMIT``)."""

    root: Path
    repo_id: str
    token: str | None = None  # when set, a private repository: requests need ``Authorization: Bearer TOKEN``
    log: list[tuple[str, str]] = field(default_factory=list)  # (method, path inside the repository)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{org}/{repo}/resolve/{revision}/{path:.*}", self._resolve)
        return app

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        info = request.match_info
        path = info["path"]
        self.log.append((request.method, path))
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.Response(status=401, headers={"X-Error-Code": "RepoNotFound"})
        file = self.root / path
        if f"{info['org']}/{info['repo']}" != self.repo_id or ".." in path.split("/") or not file.is_file():
            return web.Response(status=404, headers={"X-Error-Code": "EntryNotFound"})
        data = file.read_bytes()
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Content-Length": str(len(data))}
        if request.method == "HEAD":
            return web.Response(status=200, headers=headers)
        return web.Response(body=data, headers=headers)
