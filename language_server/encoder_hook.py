"""The one way a vision encoder runs inside the language engine's step: the coupled engine
(`pipeline/coupled.py`) gives the engine a `StepEncoder`, as vLLM's v1 engine runs its encoder.

A request whose images are to be encoded in the step enters the engine with its prompt up to its first
image (`prompt_complete=False`), as a disaggregated request waiting for its frames does. Each step, before
the schedule, the engine hands the encoder the requests the schedule would run that still wait for their
images (`Scheduler.awaiting_images`, in schedule order); the encoder encodes what its per-step budget
allows and returns each encoded request's remaining prompt pieces (`PromptPiece`: the slots' features and
the text after each), or the error that request failed with. The language forward of the whole batch
follows in the same step, so the decodes of other requests wait for that encoding.

Defined here, implemented above: the language server never imports the vision server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from dvd.language_server.request import EngineRequest, PromptPiece

# per request id: the rest of its prompt, in order, or what it failed with
Encoded = Mapping[str, Sequence[PromptPiece] | BaseException]


class StepEncoder(Protocol):
    def encode(self, requests: Sequence[EngineRequest]) -> Encoded:
        """Encode the images of the first of `requests` that fit this step's budget (at least one); the
        others wait for a later step. Runs on the engine's thread, inside `Engine.step`."""
        ...
