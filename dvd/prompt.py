"""Prompts: render the checkpoint's own chat template, then cut it into text segments around image slots.

Each image is one *slot*. The slot is expanded to `<img>` + N x `<IMG_CONTEXT>` + `</img>` only when
N is known (tiles x tokens per tile, or ViR's 64-token tiles), so the gateway never needs pixels.

Templates: GitHub-format checkpoints name an InternVL conversation template in config.json
(`template`, e.g. `internvl2_5`), which the released `chat()` uses; every other checkpoint uses the
tokenizer's Jinja chat template. `<image>` in text marks where an image goes; with images and no
placeholder, they are put before the last user turn as the model card does (`<image>\\n`, or
`Image-1: <image>\\n` ... for several).

Text a client typed stays text: the spelling of a special token in it (`<|im_start|>`, `<IMG_CONTEXT>`, ...)
is tokenized as plain characters, never as the control token (a user must not open a system turn or an image
slot by typing one), and `<image>` in a text part (content as a list of parts, where images are parts) is
not an image slot. Only `<image>` in a string content marks a slot, and only where the caller says so
(`dvd generate`'s prompt; not the client APIs, whose images are parts).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dvd.checkpoint import IMAGE_CONTEXT_TOKEN, IMAGE_END_TOKEN, IMAGE_START_TOKEN, CheckpointInfo
from dvd.errors import CheckpointError, PromptError, PromptTooLongError

IMAGE_PLACEHOLDER = "<image>"
# The default system message of InternVL's `internvl2_5` conversation template.
INTERNVL_SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
# Markers a rendered template may use for an image: DvD's `<image>`, and transformers' InternVL
# templates, which emit `<IMG_CONTEXT>` once per image part.
_SLOT_MARKER = re.compile(re.escape(IMAGE_PLACEHOLDER) + "|" + re.escape(IMAGE_CONTEXT_TOKEN))
_RESERVED = (IMAGE_START_TOKEN, IMAGE_END_TOKEN, IMAGE_CONTEXT_TOKEN)
# A literal (client text that spells a special token or a slot marker) travels through the template as an
# escape, OPEN + its index + CLOSE, and is tokenized on its own with the special tokens split. Unicode
# noncharacters: no tokenizer or template gives them meaning, and OPEN in client text is escaped itself.
_ESCAPE_OPEN, _ESCAPE_CLOSE = "\ufdd0", "\ufdd1"
_ESCAPED = re.compile(_ESCAPE_OPEN + r"(\d+)" + _ESCAPE_CLOSE)

# The model card's system prompt for thinking mode (InternVL3.5 "R1_SYSTEM_PROMPT").
THINKING_SYSTEM_PROMPT = """
You are an AI assistant that rigorously follows this response protocol:

1. First, conduct a detailed analysis of the question. Consider different angles, potential solutions, and reason through the problem step-by-step. Enclose this entire thinking process within <think> and </think> tags.

2. After the thinking section, provide a clear, concise, and direct answer to the user's query. Separate the answer from the thinking section using a clear visual delimiter, such as a horizontal rule.

Ensure that your reasoning is thorough, directly addresses the user's query, and is logically structured.
""".strip()  # noqa: E501

# The default system message of InternVL3.5-GPT-OSS's `internvl3_5_gpt_oss` conversation template.
GPT_OSS_SYSTEM_MESSAGE = (
    "You are InternVL, a large language model trained by Shanghai AI Laboratory.\nKnowledge cutoff: 2024-06\n"
    "Current date: 2025-08-06\n\nReasoning: low\n\n# Valid channels: final. Channel must be included for every message."
)
# The harmony tokens that template uses, one token each in the GPT-OSS tokenizer.
HARMONY_TOKENS = ("<|start|>", "<|message|>", "<|end|>", "<|return|>", "<|channel|>")
# A harmony answer opens with a header, `<|channel|>` + the channel's name + `<|message|>`, before its text.
HARMONY_HEADER = ("<|channel|>", "<|message|>")

# InternVL conversation templates (internvl_chat/internvl/conversation.py) DvD can render.
CONVERSATION_TEMPLATES: dict[str, dict[str, str]] = {
    "internvl2_5": {
        "system": "<|im_start|>system\n{system_message}",
        "system_message": INTERNVL_SYSTEM_MESSAGE,
        "user": "<|im_start|>user\n",
        "assistant": "<|im_start|>assistant\n",
        "sep": "<|im_end|>\n",
        "stop": "<|im_end|>",
    },
    # InternVL3.5-GPT-OSS (internvl_chat_gpt_oss/.../conversation.py, MPT_TWO, stop `<|return|>`), rendered as
    # upstream's get_prompt() renders it: the generation prompt ends with `<|start|>assistant` and the model writes
    # `<|channel|>final<|message|>` + the answer (so DvD's token ids are chat()'s). chat() decodes with the special
    # tokens and keeps that header in the history it replays; a client sends back the answer it was shown, without
    # the header (the detokenizer hides it), so `answer_header` goes back in front of each replayed answer.
    "internvl3_5_gpt_oss": {
        "system": "<|start|>system<|message|>{system_message}",
        "system_message": GPT_OSS_SYSTEM_MESSAGE,
        "user": "<|start|>user<|message|>",
        "assistant": "<|start|>assistant",
        "answer_header": "<|channel|>final<|message|>",
        "sep": "<|end|>",
        "stop": "<|return|>",
    },
}

Message = dict[str, Any]


@dataclass(frozen=True)
class ImageTokens:
    """The image tokens' ids and the one layout of an image slot: `<img>` + N x `<IMG_CONTEXT>` + `</img>`,
    N being the rows of the slot's features.

    Written as the pieces a language server feeds its engine as features arrive: the text up to the
    first slot's `<img>` (`head`), then per slot its N x `<IMG_CONTEXT>` + `</img>`, the text after it and,
    unless it is the last, the next slot's `<img>` (`piece`). Each piece starts where its slot's features
    go, and needs only that slot's N. A whole prompt (`expand`) is the same pieces joined.
    """

    start_id: int
    context_id: int
    end_id: int

    def head(self, first_segment: Sequence[int], num_slots: int) -> list[int]:
        """The prompt up to the first slot's features: the first text segment, and `<img>` if there is a slot."""
        return [*first_segment, *([self.start_id] if num_slots else [])]

    def piece(self, num_tokens: int, segment: Sequence[int], last: bool) -> list[int]:
        """A slot's features' tokens, `</img>`, the text after it, and the next slot's `<img>` unless `last`."""
        return [*([self.context_id] * num_tokens), self.end_id, *segment, *([] if last else [self.start_id])]

    def expand(self, segments: Sequence[Sequence[int]], tokens_per_slot: Sequence[int]) -> list[int]:
        """Token ids of the whole prompt: `len(segments) - 1` slots, slot i of tokens_per_slot[i] rows."""
        ids = self.head(segments[0], len(tokens_per_slot))
        for i, (n, segment) in enumerate(zip(tokens_per_slot, segments[1:], strict=True)):
            ids += self.piece(n, segment, last=i == len(tokens_per_slot) - 1)
        return ids


@dataclass(frozen=True)
class PromptTokens:
    """A tokenized prompt: `len(segments) == num_images + 1` text pieces with an image slot between each."""

    segments: tuple[tuple[int, ...], ...]

    @property
    def num_images(self) -> int:
        return len(self.segments) - 1

    @property
    def num_text_tokens(self) -> int:
        return sum(len(s) for s in self.segments)

    def expand(self, tokens_per_image: Sequence[int], image: ImageTokens) -> list[int]:
        """Token ids with slot i expanded to `<img>` + tokens_per_image[i] x `<IMG_CONTEXT>` + `</img>`."""
        if len(tokens_per_image) != self.num_images:
            raise PromptError(f"prompt has {self.num_images} image slots but {len(tokens_per_image)} images' sizes")
        return image.expand(self.segments, tokens_per_image)


def _count_placeholders(content: Any) -> int:
    if isinstance(content, str):
        return content.count(IMAGE_PLACEHOLDER)
    return sum(1 for part in content if part.get("type") == "image")


def frame_parts(num_frames: int) -> list[dict[str, Any]]:
    """A video's frames as the model card prompts them, `Frame1: <image>\nFrame2: <image>\n...`: one
    image part (one slot) per frame, each after its `FrameN: ` label."""
    return [part for i in range(num_frames) for part in ({"type": "text", "text": f"Frame{i + 1}: "},
                                                        {"type": "image"})]


def _is_text(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "text"


def _is_video(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "video"


def _expand_videos(messages: Sequence[Message]) -> list[Message]:
    """Video parts ({"type": "video", "num_frames": N}) as their frames' labelled image parts."""
    out = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(_is_video(p) for p in content):
            parts = [q for p in content for q in (frame_parts(p["num_frames"]) if _is_video(p) else [p])]
            message = {**message, "content": parts}
        out.append(message)
    return out


def _validate(messages: Sequence[Message]) -> None:
    if not messages:
        raise PromptError("messages is empty")
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant"):
            raise PromptError(f"messages[{i}].role is {role!r}; expected system, user or assistant")
        parts = [content] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise PromptError(f"messages[{i}].content must be a string or a list of parts")
        for j, part in enumerate(parts):
            text = part if isinstance(part, str) else part.get("text", "") if isinstance(part, dict) else None
            if text is None or (isinstance(part, dict) and part.get("type") not in ("text", "image")):
                raise PromptError(f"messages[{i}].content[{j}] must be a text or image part")
    if messages[-1]["role"] != "user":
        raise PromptError("the last message must be from the user")


def _with_default_placeholders(messages: Sequence[Message], num_images: int) -> list[Message]:
    """Check placeholder count; with images and none given, put them before the last user turn."""
    messages = [dict(m) for m in messages]
    found = sum(_count_placeholders(m["content"]) for m in messages)
    if found == 0 and num_images:
        if num_images == 1:
            prefix = IMAGE_PLACEHOLDER + "\n"
        else:
            prefix = "".join(f"Image-{i}: {IMAGE_PLACEHOLDER}\n" for i in range(1, num_images + 1))
        last = messages[-1]
        content = last["content"]
        last["content"] = prefix + content if isinstance(content, str) else [{"type": "text", "text": prefix}, *content]
    elif found != num_images:
        raise PromptError(f"prompt has {found} image placeholders but {num_images} images were given")
    return messages


class _Literals:
    """The client's spellings of special tokens and slot markers, escaped in its messages before the template
    renders them and tokenized as plain text after (`tokenize`)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        specials = {*tokenizer.all_special_tokens, *(t.content for t in tokenizer.added_tokens_decoder.values()
                                                     if t.special)}
        # longest first: a token that contains another is matched whole
        self.spellings = sorted(specials | {_ESCAPE_OPEN}, key=len, reverse=True)
        self._in_strings = self._pattern(self.spellings)  # string content: `<image>` stays a slot marker
        self._in_parts = self._pattern([IMAGE_PLACEHOLDER, *self.spellings])
        self._index = {s: i for i, s in enumerate([IMAGE_PLACEHOLDER, *self.spellings])}

    @staticmethod
    def _pattern(spellings: Sequence[str]) -> re.Pattern[str]:
        return re.compile("|".join(re.escape(s) for s in sorted(spellings, key=len, reverse=True)))

    def _escape(self, text: str, pattern: re.Pattern[str]) -> str:
        return pattern.sub(lambda m: f"{_ESCAPE_OPEN}{self._index[m.group()]}{_ESCAPE_CLOSE}", text)

    def escape(self, messages: Sequence[Message], text_placeholders: bool) -> list[Message]:
        """`text_placeholders`: `<image>` in a string content marks a slot (else it is text there too)."""
        in_strings = self._in_strings if text_placeholders else self._in_parts
        out = []
        for message in messages:
            content = message["content"]
            if isinstance(content, str):
                content = self._escape(content, in_strings)
            else:
                content = [{**p, "text": self._escape(p["text"], self._in_parts)} if _is_text(p) else p
                           for p in content]
            out.append({**message, "content": content})
        return out

    def tokenize(self, piece: str) -> list[int]:
        """Token ids of a rendered piece: the template's text as the tokenizer reads it (its special tokens
        are control tokens), each escaped literal as characters (`split_special_tokens`)."""
        chunks = _ESCAPED.split(piece)  # text, index, text, index, ..., text
        if len(chunks) == 1:  # nothing escaped: exactly what the tokenizer makes of the rendered prompt
            return self.tokenizer.encode(piece, add_special_tokens=False)
        spellings = [IMAGE_PLACEHOLDER, *self.spellings]
        ids: list[int] = []
        for i, chunk in enumerate(chunks):
            literal = i % 2 == 1
            text = spellings[int(chunk)] if literal else chunk
            if text:
                ids += self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=literal)
        return ids


def _flatten(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(IMAGE_PLACEHOLDER + "\n" if p["type"] == "image" else p["text"] for p in content)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")  # one is enough


def load_tokenizer(path: Path) -> Any:
    """The checkpoint's tokenizer, built from the class its tokenizer_config.json names (InternVL3.5:
    Qwen2Tokenizer), which needs neither torch nor the model: the gateway tokenizes without loading
    torch. AutoTokenizer (its config machinery imports torch) only when the file names no class
    transformers has."""
    import transformers

    if not any((path / name).exists() for name in TOKENIZER_FILES):  # else AutoTokenizer builds one with no vocab
        raise CheckpointError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy the checkpoint's "
                              "tokenizer into it")
    config = path / "tokenizer_config.json"
    name = json.loads(config.read_text()).get("tokenizer_class") if config.exists() else None
    cls = None
    if isinstance(name, str):
        cls = getattr(transformers, name, None) or getattr(transformers, name.removesuffix("Fast"), None)
    if cls is None:
        cls = transformers.AutoTokenizer
    return cls.from_pretrained(str(path))


class ChatFormat:
    """A checkpoint's tokenizer, chat template and stop tokens; turns chats into `PromptTokens`."""

    def __init__(self, info: CheckpointInfo, tokenizer: Any | None = None) -> None:
        self.info = info
        self.tokenizer = tokenizer or load_tokenizer(Path(info.path))
        processor_template = Path(info.path) / "chat_template.json"  # where HF processors keep theirs
        if not self.tokenizer.chat_template and processor_template.exists():
            self.tokenizer.chat_template = json.loads(processor_template.read_text()).get("chat_template")
        self.conversation = None
        if info.format == "github" and info.template:
            if info.template not in CONVERSATION_TEMPLATES:
                raise CheckpointError(
                    f"{info.path / 'config.json'}: conversation template {info.template!r} is not supported; "
                    f"supported: {sorted(CONVERSATION_TEMPLATES)}"
                )
            self.conversation = CONVERSATION_TEMPLATES[info.template]
            if self.conversation["stop"] not in self.tokenizer.get_vocab():
                raise CheckpointError(f"{info.path}: the tokenizer lacks {self.conversation['stop']}, the stop token "
                                      f"of the conversation template {info.template!r}")
        elif not self.tokenizer.chat_template:
            raise CheckpointError(f"{info.path}: the tokenizer has no chat template and config.json names none")
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in _RESERVED if t not in vocab]
        if missing:
            raise CheckpointError(f"{info.path}: tokenizer lacks the image tokens {missing}")
        self.image_start_id, self.image_end_id, self.image_context_id = (vocab[t] for t in _RESERVED)
        self.image_tokens = ImageTokens(self.image_start_id, self.image_context_id, self.image_end_id)
        self.literals = _Literals(self.tokenizer)
        self.stop_token_ids = self._stop_token_ids(vocab)
        # A tokenizer with the harmony header's tokens (GPT-OSS, either format): the ids of `<|channel|>` and
        # `<|message|>`, between which an answer names its channel before its text (the detokenizer hides it).
        channel, message = HARMONY_HEADER
        self.answer_header: tuple[int, int] | None = (vocab[channel], vocab[message]) \
            if channel in vocab and message in vocab else None
        # The language model's context, as its engine checks it (max_position_embeddings), so the gateway
        # refuses a prompt that cannot fit before any image is encoded.
        self.context_limit = int(info.text_config.get("max_position_embeddings") or 1 << 62)
        # The fewest tokens an image slot can take: one tile (ViR may compress a Flash tile to a quarter).
        self.min_slot_tokens = info.tokens_per_tile // (4 if info.flash else 1)

    def _stop_token_ids(self, vocab: dict[str, int]) -> tuple[int, ...]:
        ids: list[int] = []
        path = Path(self.info.path) / "generation_config.json"
        if path.exists():
            eos = json.loads(path.read_text()).get("eos_token_id")
            ids += eos if isinstance(eos, list) else [] if eos is None else [eos]
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        if self.conversation is not None:
            ids.append(vocab[self.conversation["stop"]])
        return tuple(dict.fromkeys(int(i) for i in ids))

    def render(self, messages: Sequence[Message], thinking: bool = False) -> str:
        """The prompt text, with one slot marker per image, ending with the assistant's turn opening."""
        system = self.info.system_message
        if thinking:
            system = THINKING_SYSTEM_PROMPT
        if messages and messages[0]["role"] == "system":
            system, messages = _flatten(messages[0]["content"]), messages[1:]
        if self.conversation is None:
            chat = ([{"role": "system", "content": system}] if system is not None else []) + list(messages)
            return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        conv = self.conversation
        text = conv["system"].format(system_message=system if system is not None else conv["system_message"])
        text += conv["sep"]
        for message in messages:
            content = _flatten(message["content"])
            if message["role"] == "system":  # a later system turn: ChatML's, as the Jinja templates render it
                text += conv["system"].format(system_message=content) + conv["sep"]
            elif message["role"] == "assistant":
                text += conv["assistant"] + conv.get("answer_header", "") + content + conv["sep"]
            else:
                text += conv["user"] + content + conv["sep"]
        return text + conv["assistant"]

    def build(self, messages: Sequence[Message], num_images: int, thinking: bool = False,
              text_placeholders: bool = True) -> PromptTokens:
        """`num_images` counts slots: one per image, one per frame of each video part. `text_placeholders`
        False (the client APIs, whose images are parts): `<image>` in a string content is text, not a slot."""
        messages = _expand_videos(messages)
        _validate(messages)
        # escaped before the default placeholders go in: those are DvD's, the client's text is literal
        escaped = self.literals.escape(messages, text_placeholders)
        text = self.render(_with_default_placeholders(escaped, num_images), thinking)
        pieces = _SLOT_MARKER.split(text)
        if len(pieces) - 1 != num_images:
            raise PromptError(f"the rendered prompt has {len(pieces) - 1} image slots but {num_images} images")
        prompt = PromptTokens(tuple(tuple(self.literals.tokenize(p)) for p in pieces))
        self._check_length(prompt)
        return prompt

    def _check_length(self, prompt: PromptTokens) -> None:
        """PromptTooLongError when even the fewest tokens the images can take (one tile each, plus `<img>`
        and `</img>`) leave no room for an answer in the context."""
        fewest = prompt.num_text_tokens + prompt.num_images * (self.min_slot_tokens + 2)
        if fewest >= self.context_limit:
            raise PromptTooLongError(fewest, self.context_limit, at_least=prompt.num_images > 0)

    def expand(self, prompt: PromptTokens, tokens_per_image: Sequence[int]) -> list[int]:
        return prompt.expand(tokens_per_image, self.image_tokens)

