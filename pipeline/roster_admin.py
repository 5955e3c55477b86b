"""Where the deployment that runs a gateway tells it its roster: a Unix socket in a private directory, never a
network port (`dvd cluster`'s autoscaler, through the gateway's Ray actor, adds and removes replicas here).

Authenticated by the operating system: the socket sits in the gateway's own 0700 directory (the supervisor's,
deploy/supervisor.py), and every connection's peer credentials (SO_PEERCRED) must be this process's own
user, else 403. The API is HTTP over that socket:
    GET /roster                     -> {"data": [each server as /v1/instances lists it]}
    PUT /roster {"vision": [HOST:PORT, ...], "language": [...], "drain_timeout_s": 300}
                                    -> {"added": [...], "removed": [...], "drained": true}, once every server
                                       taken out has finished the calls it held (or the timeout passed)
A bad body is a 400 naming the field. `RosterClient` is the other end, for the actor.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import struct
from pathlib import Path
from typing import Any

from aiohttp import web

from dvd.config_file import ConfigError
from dvd.pipeline.backends.disaggregated import DisaggregatedBackend
from dvd.pipeline.replicas import check_address

log = logging.getLogger(__name__)
DRAIN_TIMEOUT_S = 300.0  # a long generation on a language server being removed may take this long to finish
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _addresses(body: dict[str, Any], kind: str) -> list[str]:
    value = body.get(kind, [])
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise ConfigError(f"{kind}: a list of HOST:PORT addresses, got {value!r}")
    for i, address in enumerate(value):
        check_address(address, f"{kind}[{i}]")
    if len(set(value)) != len(value):
        raise ConfigError(f"{kind}: an address is listed twice: {', '.join(value)}")
    return value


class RosterAdmin:
    """The roster socket of one gateway (see the module docstring)."""

    def __init__(self, backend: DisaggregatedBackend, path: Path) -> None:
        self.backend, self.path = backend, path
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(middlewares=[self._same_user])
        app.add_routes([web.get("/roster", self.get), web.put("/roster", self.put)])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.path.unlink(missing_ok=True)  # a predecessor's (a restarted actor's)
        await web.UnixSite(self._runner, str(self.path)).start()
        self.path.chmod(0o600)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        self.path.unlink(missing_ok=True)

    @web.middleware
    async def _same_user(self, request: web.Request, handler: Any) -> web.StreamResponse:
        sock = request.transport.get_extra_info("socket") if request.transport else None
        uid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))[1] \
            if sock is not None else -1
        if uid != os.getuid():
            log.warning("roster socket: refused a connection from uid %d", uid)
            return web.json_response({"error": "only the gateway's own user may change its roster"}, status=403)
        return await handler(request)

    async def get(self, request: web.Request) -> web.Response:
        return web.json_response({"data": self.backend.instances()})

    async def put(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ConfigError("the body must be a JSON object with vision and language lists")
            vision, language = _addresses(body, "vision"), _addresses(body, "language")
            drain = float(body.get("drain_timeout_s", DRAIN_TIMEOUT_S))
            answer = await self.backend.set_roster(vision, language, drain)
        except (ValueError, TypeError) as exc:  # ConfigError and bad JSON included
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(answer)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout_s: float) -> None:
        super().__init__("localhost", timeout=timeout_s)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self.path))


class RosterClient:
    """The other end of a gateway's roster socket (blocking: a Ray actor's method calls it)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _call(self, method: str, body: dict[str, Any] | None, timeout_s: float) -> Any:
        connection = _UnixConnection(self.path, timeout_s)
        try:
            connection.request(method, "/roster", body=json.dumps(body) if body is not None else None,
                               headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            answer = json.loads(response.read())
        finally:
            connection.close()
        if response.status != 200:
            raise RuntimeError(f"gateway roster {method}: {response.status} {answer.get('error', answer)}")
        return answer

    def instances(self, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        return list(self._call("GET", None, timeout_s)["data"])

    def set(self, vision: list[str], language: list[str], drain_timeout_s: float = DRAIN_TIMEOUT_S) -> dict[str, Any]:
        body = {"vision": vision, "language": language, "drain_timeout_s": drain_timeout_s}
        return dict(self._call("PUT", body, drain_timeout_s + 60))
