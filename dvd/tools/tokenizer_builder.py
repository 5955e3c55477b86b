"""Build a real byte-level BPE tokenizer with InternVL's special tokens and chat template, offline.

Random-weight checkpoints still need a tokenizer that behaves like the released one: ChatML
turns, `<img>`/`<IMG_CONTEXT>`/`</img>` as single special tokens, a Jinja chat template. The BPE
merges are learned from a small built-in text, so building one takes milliseconds.
"""

from __future__ import annotations

import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dvd.prompt import INTERNVL_SYSTEM_MESSAGE

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
]
ADDED_TOKENS = ["<think>", "</think>"]

# ChatML with InternVL's default system message. A string content is used as is (its `<image>`
# placeholders are expanded by DvD); an image content part renders as `<image>\n`.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '" + INTERNVL_SYSTEM_MESSAGE + "' -%}{%- endif -%}"
    "{{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' -}}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_CORPUS = """
Describe the image in detail. What is shown in this picture? The photograph shows a cat sitting on
a wooden table next to a window, with sunlight falling across a red cup and an open book.
Please answer the question briefly. How many people are in the image? There are three people
walking along the beach at sunset; the sky is orange and purple, and the sea is calm.
Write a short poem about the image. The mountains rise above the clouds, green valleys below,
a river winds through fields of wheat and small villages with white houses and blue roofs.
Read the text in the chart and summarise the trend. Sales grew from 12 to 48 million between
2019 and 2024, with the largest increase in the third quarter of 2022.
First, think step by step, then give the final answer. The answer is 42 because 6 times 7 is 42.
你好，请描述这张图片。图片中有一只猫和一本书。Image-1: Image-2: Frame1: Frame2:
""".strip()


def build_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of about `vocab_size` entries (specials included)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS) - len(ADDED_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return _wrap(tokenizer)


def padded_to(tokenizer: PreTrainedTokenizerFast, size: int) -> PreTrainedTokenizerFast:
    """`tokenizer` with ids up to `size` (see `_pad_vocabulary`); itself when it has that many already."""
    if size <= len(tokenizer):
        return tokenizer
    return _wrap(_pad_vocabulary(tokenizer.backend_tokenizer, len(tokenizer), size))


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        clean_up_tokenization_spaces=False,
    )
    fast.add_tokens(ADDED_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _pad_vocabulary(tokenizer: Tokenizer, start: int, end: int) -> Tokenizer:
    """Ids [start, end) as vocabulary entries " w<id>" that no merge produces: encoding is unchanged,
    and a model whose vocabulary is the released one's (151 936 ids for the 1b-shaped preset) decodes
    every id it may sample to printable text. Without them, sampled ids past the 643 learned tokens
    decoded to '' and clients such as AIPerf dropped the empty answers."""
    data = json.loads(tokenizer.to_str())
    vocab = data["model"]["vocab"]
    # The added (special) tokens enter the model's vocabulary at their ids too: loading gives added tokens
    # absent from it new ids after the model's vocabulary, which would move <IMG_CONTEXT> and the rest.
    vocab |= {token["content"]: token["id"] for token in data["added_tokens"]}
    for i in range(start, end):
        vocab[f"\u0120w{i}"] = i  # the byte-level alphabet's space, so it decodes to " w<id>"
    return Tokenizer.from_str(json.dumps(data))
