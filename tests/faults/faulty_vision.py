"""`dvd vision` with one fault built in, for the fault tests only: it pushes slot 0's features of each
request and then freezes itself (SIGSTOP) before any other slot leaves, so a test can kill it at the
moment "some frames of a multi-image request sent, the rest never". The test kills it with SIGKILL.

    python -m tests.faults.faulty_vision --model DIR --port 0 --token-file FILE   (the `dvd vision` flags)
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

from dvd.cli import main
from dvd.vision_server.engine import VisionEngine

_send = VisionEngine._send


async def _send_first_slot_then_freeze(self: VisionEngine, sender: Any, destination: str, request: Any, slot: int,
                                       *args: Any) -> None:
    if slot != 0:
        await asyncio.Event().wait()  # never sent: the process freezes after slot 0
    await _send(self, sender, destination, request, slot, *args)
    os.kill(os.getpid(), signal.SIGSTOP)  # slot 0's bytes are with the kernel; nothing else leaves


if __name__ == "__main__":
    VisionEngine._send = _send_first_slot_then_freeze  # type: ignore[method-assign]
    sys.exit(main(["vision", *sys.argv[1:]]))
