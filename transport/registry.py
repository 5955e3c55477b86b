"""Transport kinds by name: a table, resolved lazily so `rdma` imports UCXX only when asked for."""

from __future__ import annotations

from typing import Any

from dvd.named import load_named
from dvd.transport.base import Receiver, Sender
from dvd.transport.config import TransportConfig
from dvd.transport.errors import TransportError

# kind -> ("module:SenderClass", "module:ReceiverClass").
KINDS: dict[str, tuple[str, str]] = {
    "tcp": ("dvd.transport.tcp_sender:TcpSender", "dvd.transport.tcp_receiver:TcpReceiver"),
    "rdma": ("dvd.transport.rdma:RdmaSender", "dvd.transport.rdma:RdmaReceiver"),
    "inproc": ("dvd.transport.inproc:InprocSender", "dvd.transport.inproc:InprocReceiver"),
}
# What to install when a kind's module cannot import.
EXTRAS: dict[str, str] = {"rdma": "pip install 'internvl-dvd[rdma]' (ucxx-cu12)"}


def _load(kind: str, side: int) -> type:
    sides = {name: specs[side] for name, specs in KINDS.items()}
    try:
        cls: type = load_named(sides, kind, "transport kind")
    except ValueError as error:  # not a kind
        raise TransportError(str(error)) from None
    except ImportError as error:
        hint = EXTRAS.get(kind, "")
        raise TransportError(f"transport {kind!r} is unavailable ({error}); install the "
                             f"'{kind}' extra: {hint}") from error
    return cls


def create_sender(config: TransportConfig, **options: Any) -> Sender:
    """A sender of kind `config.kind`; `options` go to its class (inproc needs `hub=`)."""
    return _load(config.kind, 0)(config, **options)


def create_receiver(config: TransportConfig, **options: Any) -> Receiver:
    """A receiver of kind `config.kind` (call `start()` or use `async with`)."""
    return _load(config.kind, 1)(config, **options)
