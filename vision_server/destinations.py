"""Where a vision server may push features: only to language servers (their transport addresses), never
to an address a caller picked.

The allow-list is what the server was configured with (`VisionServerConfig.allowed_destinations`: the
language servers of its deployment, where their addresses are fixed) and what gateways announced over
the authenticated channel (`Vision.AllowDestinations`: the transport addresses their language servers
report in Health). An Encode naming any other destination is refused before any work and before any
connection (`DestinationNotAllowedError`, PERMISSION_DENIED, naming it). Announcements only add (several
gateways may share a server), up to `MAX_DESTINATIONS`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from dvd.errors import DestinationNotAllowedError, InvalidRequestError

logger = logging.getLogger(__name__)
MAX_DESTINATIONS = 4096


def normalized(destination: str, default_kind: str) -> str:
    """`kind://host:port` (`inproc://name`), the form Encode and Health use; raises InvalidRequestError for anything
    else."""
    kind, sep, rest = destination.partition("://")
    if not sep:
        kind, rest = default_kind, destination
    if kind == "inproc" and rest:  # a receiver in this process, by name (transport/inproc.py): no host or port
        return f"inproc://{rest}"
    host, colon, port = rest.rpartition(":")
    if not kind or not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidRequestError(f"destination {destination!r} is not [KIND://]HOST:PORT")
    return f"{kind}://{host}:{port}"


class AllowList:
    def __init__(self, configured: Iterable[str], default_kind: str) -> None:
        self.default_kind = default_kind
        self._allowed = {normalized(d, default_kind) for d in configured}

    def __len__(self) -> int:
        return len(self._allowed)

    def allow(self, destinations: Iterable[str]) -> None:
        """Add announced destinations; all or none (one malformed, or too many in all, refuses the lot)."""
        new = {normalized(d, self.default_kind) for d in destinations} - self._allowed
        if len(self._allowed) + len(new) > MAX_DESTINATIONS:
            raise InvalidRequestError(f"announcing {len(new)} more destinations would pass this server's limit of "
                                      f"{MAX_DESTINATIONS}")
        if new:
            logger.info("may now push features to %s", ", ".join(sorted(new)))
        self._allowed |= new

    def check(self, destination: str) -> str:
        """`destination` normalized, if allowed; else DestinationNotAllowedError naming it."""
        target = normalized(destination, self.default_kind)
        if target not in self._allowed:
            raise DestinationNotAllowedError(
                f"destination {destination} is not a language server this vision server may push to (allowed: "
                f"{len(self._allowed)} configured or announced by a gateway); nothing was encoded or sent")
        return target
