"""A gateway backend with no servers and a chat format with no checkpoint, for tests of the serving core and the
frontends: subclasses write only `generate`."""

from __future__ import annotations

from typing import Any

from dvd.pipeline.backends.base import Backend
from dvd.prompt import PromptTokens


class StubTokenizer:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


class StubChat:
    """A chat format whose prompt is the first message's text, one token per character."""

    tokenizer = StubTokenizer()
    stop_token_ids = (0,)
    answer_header = None  # no harmony header: every answer shown whole

    def build(self, messages: list[dict[str, Any]], num_images: int, thinking: bool = False,
              text_placeholders: bool = True) -> PromptTokens:
        content = messages[0]["content"]
        return PromptTokens((tuple(map(ord, content if isinstance(content, str) else content[0]["text"])),))


class StubBackend(Backend):
    """Healthy, with no servers; `generate` is the subclass's."""

    model_name = "m"
    mode = "test"

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def health(self) -> tuple[bool, str]:
        return True, "ok"

    def instances(self) -> list[dict[str, Any]]:
        return []
