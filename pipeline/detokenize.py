"""Output tokens -> the text a client sees, here and nowhere else: incremental detokenization with stop strings
(every frontend's stream) and `answer_text` (a whole answer: `dvd generate`, the coupled pipeline's result).

A harmony answer (GPT-OSS) opens with a header, `<|channel|>final<|message|>`, that the model writes and the
tokens keep (so they equal transformers' chat()); the text starts after it, as vLLM's content does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dvd.prompt import ChatFormat


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas; finds stop strings as they complete.

    Each step decodes only the tokens since the last clean point (plus the few before it, so byte
    merges resolve), not the whole output: the cost per token stays flat however long the answer.
    Text that could still be the start of a stop string, or an incomplete UTF-8 sequence, is held
    back until it is known, so a client never sees part of a stop string.

    `answer_header`: the ids of `<|channel|>` and `<|message|>` (`ChatFormat.answer_header`). An answer whose
    first token is `<|channel|>` shows only what follows the first `<|message|>`: the channel's name is held
    back until the header closes, never sent and retracted. Any other answer is shown whole.
    """

    def __init__(self, tokenizer: Any, stop_token_ids: Sequence[int] = (), stop_strings: Sequence[str] = (),
                 answer_header: tuple[int, int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop_token_ids = set(stop_token_ids)
        self.stop_strings = tuple(stop_strings)
        self._header = answer_header  # None once decided: no header, or past it
        self._in_header = False
        self.token_ids: list[int] = []
        self.text = ""  # decoded so far (complete characters only until flush)
        self.num_emitted_chars = 0
        self.stopped = False
        # ids[prefix_offset:read_offset] decode to text already in self.text (vLLM's scheme)
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_ids: Sequence[int]) -> str:
        """Feed new tokens; returns the text that is now safe to send."""
        if self.stopped:
            return ""
        self.token_ids += self._past_header([t for t in token_ids if t not in self.stop_token_ids])
        seen = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        now = self._decode(self.token_ids[self._prefix_offset :])
        if len(now) > len(seen) and not now.endswith("\ufffd"):
            self.text += now[len(seen) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        return self._after_growth()

    def _past_header(self, ids: list[int]) -> list[int]:
        """`ids` less the answer's header, if the answer opens with one: none of them while it is still open."""
        if self._header is None or not ids:
            return ids
        channel, message = self._header
        if not self._in_header:
            if ids[0] != channel:
                self._header = None  # no header: all of the answer is text
                return ids
            self._in_header = True
        if message not in ids:
            return []
        self._header = None  # later harmony tokens are the answer's own (decoding skips them as special)
        return ids[ids.index(message) + 1 :]

    def _after_growth(self) -> str:
        for stop in self.stop_strings:
            at = self.text.find(stop, max(0, self.num_emitted_chars - len(stop)))
            if at != -1:
                self.text = self.text[:at]
                self.stopped = True
        safe = len(self.text)
        if not self.stopped:
            hold = 0
            for stop in self.stop_strings:
                hold = max([hold, *(k for k in range(1, len(stop)) if self.text.endswith(stop[:k]))])
            safe -= hold
        return self._emit(max(safe, self.num_emitted_chars))

    def flush(self) -> str:
        """At the end: everything not yet sent, an incomplete character included."""
        delta = ""
        if not self.stopped:
            seen = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
            self.text += self._decode(self.token_ids[self._prefix_offset :])[len(seen) :]
            self._read_offset = self._prefix_offset = len(self.token_ids)
            delta = self._after_growth()
        return delta + self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        delta = self.text[self.num_emitted_chars : upto]
        self.num_emitted_chars = upto
        return delta


def answer_text(chat: ChatFormat, token_ids: Sequence[int]) -> str:
    """A whole answer's text as a client sees it: what a stream of the same tokens adds up to."""
    decoder = IncrementalDecoder(chat.tokenizer, chat.stop_token_ids, answer_header=chat.answer_header)
    return decoder.add(token_ids) + decoder.flush()
