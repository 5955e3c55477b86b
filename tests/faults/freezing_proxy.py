"""A TCP proxy on loopback that can make a peer vanish without a FIN: `cut()` freezes every connection through it
for good (its bytes stay unread in the kernel's buffers, nothing is answered, nothing is closed: a gateway whose
host lost power, or a NAT that forgot the flow, looks so to the server). Connections opened while cut wait in the
listen backlog, unanswered, as a dial across a dead link waits for its SYN to get through; `restore()` forwards
them, and every later one. The frozen ones stay frozen until `close()`. No root and no network namespace: what it
does is the same on any machine."""

from __future__ import annotations

import selectors
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class FreezingProxy:
    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.listener, selectors.EVENT_READ)
        self._peers: dict[socket.socket, socket.socket] = {}  # each forwarded socket -> the other end
        self._frozen: list[socket.socket] = []  # held open, never read, never closed (until close())
        self._listening = True  # accepting (not cut)
        self._lock = threading.Lock()  # the loop forwards only while holding it: cut() waits for a chunk in flight
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def cut(self) -> None:
        """From now on nothing crosses: every open connection is frozen for good, new ones wait unanswered."""
        with self._lock:
            self._selector.unregister(self.listener)
            self._listening = False
            for sock in list(self._peers):
                self._freeze(sock)

    def restore(self) -> None:
        """Connections waiting, and those opened from now on, are forwarded; the frozen ones stay as they are."""
        with self._lock:
            self._selector.register(self.listener, selectors.EVENT_READ)
            self._listening = True

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for sock in [*self._peers, *self._frozen, self.listener]:
            sock.close()
        self._selector.close()

    def _freeze(self, sock: socket.socket) -> None:
        if sock in self._peers:  # not frozen yet with its other end
            self._peers.pop(sock)
            self._selector.unregister(sock)
            self._frozen.append(sock)

    def _loop(self) -> None:
        while not self._stop.is_set():
            events = self._selector.select(0.05)
            with self._lock:
                for key, _ in events:
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is self.listener:
                        if self._listening:  # an event seen before a cut() that came first
                            self._accept()
                    elif sock in self._peers:
                        self._forward(sock)

    def _accept(self) -> None:
        client, _ = self.listener.accept()
        upstream = socket.create_connection(self.target)
        for a, b in ((client, upstream), (upstream, client)):
            self._peers[a] = b
            self._selector.register(a, selectors.EVENT_READ)

    def _forward(self, sock: socket.socket) -> None:
        other = self._peers[sock]
        try:
            data = sock.recv(1 << 16)
            if data:
                other.sendall(data)
                return
        except OSError:
            pass
        for end in (sock, other):  # an ordinary close (or reset) is passed on as one
            del self._peers[end]
            self._selector.unregister(end)
            end.close()


@contextmanager
def freezing_proxy(target: str) -> Iterator[FreezingProxy]:
    proxy = FreezingProxy(target)
    try:
        yield proxy
    finally:
        proxy.close()
