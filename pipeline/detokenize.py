"""Incremental detokenization with stop strings, shared by every frontend."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas; finds stop strings as they complete.

    Text that could still be the start of a stop string, or an incomplete UTF-8 sequence, is held
    back until it is known, so a client never sees part of a stop string.
    """

    def __init__(self, tokenizer: Any, stop_token_ids: Sequence[int] = (), stop_strings: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop_token_ids = set(stop_token_ids)
        self.stop_strings = tuple(stop_strings)
        self.token_ids: list[int] = []
        self.num_emitted_chars = 0
        self.text = ""
        self.stopped = False

    def add(self, token_ids: Sequence[int]) -> str:
        """Feed new tokens; returns the text that is now safe to send."""
        if self.stopped:
            return ""
        self.token_ids += [t for t in token_ids if t not in self.stop_token_ids]
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        for stop in self.stop_strings:
            at = self.text.find(stop, max(0, self.num_emitted_chars - len(stop)))
            if at != -1:
                self.text = self.text[:at]
                self.stopped = True
        safe = len(self.text)
        if not self.stopped:
            hold = 1 if self.text.endswith("\ufffd") else 0
            for stop in self.stop_strings:
                hold = max([hold, *(k for k in range(1, len(stop)) if self.text.endswith(stop[:k]))])
            safe -= hold
        return self._emit(max(safe, self.num_emitted_chars))

    def flush(self) -> str:
        """At the end: everything not yet sent."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        delta = self.text[self.num_emitted_chars : upto]
        self.num_emitted_chars = upto
        return delta
