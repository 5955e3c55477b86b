"""Tables of name -> "package.module:Attribute" (or "package.module"), imported only when a name is chosen.

The `dvd` command's subcommands, the benchmarks, the transport kinds and the gateway's backends are each
such a table: choosing one costs only its own imports (`dvd --help` imports no subcommand, `rdma` loads
UCXX only when asked for).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any


def load(spec: str) -> Any:
    """The module `spec` names, or with ":Attribute" that attribute of it (e.g. a class)."""
    module_name, _, attribute = spec.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attribute) if attribute else module


def load_named(table: Mapping[str, str], name: str, what: str) -> Any:
    """What `table[name]` names, imported; ValueError naming `what` and the choices for a name not in it."""
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; choose from {sorted(table)}")
    return load(table[name])
