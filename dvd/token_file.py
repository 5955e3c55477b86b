"""The shared transport token, from a file or the environment, never from the command line (argv
is visible to every user of the machine in `ps`).

Read when a command runs, never at import. Servers that `dvd serve` or `dvd launch` start get the
token inside their private (0600) config file instead.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from dvd.config_file import ConfigError

TOKEN_ENV = "DVD_TOKEN"  # the token itself, for platforms that inject secrets as variables
log = logging.getLogger(__name__)


def read_token_file(path: Path) -> str:
    """The token in `path` (surrounding whitespace dropped; `~` expanded); refuses a missing or empty file."""
    path = path.expanduser()
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"token_file {path}: cannot read it: {exc.strerror or exc}") from None
    if not text:
        raise ConfigError(f"token_file {path}: the file is empty")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("token file %s is readable by other users (mode %o): chmod 600 it", path, mode & 0o777)
    return text


def resolve_token(current: str | None, token_file: Path | None) -> str | None:
    """The token a server runs with: one already in its config (from dvd serve / dvd launch), else
    the token file, else $DVD_TOKEN, else None (no check: fine on loopback only)."""
    if current:
        return current
    if token_file is not None:
        return read_token_file(token_file)
    return os.environ.get(TOKEN_ENV) or None


def write_token_file(path: Path, token: str) -> None:
    """Write a token readable by this user only."""
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(token + "\n")
