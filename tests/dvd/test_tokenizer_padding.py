"""A preset tokenizer padded to the model's vocabulary: every id decodes to text, nothing else moves."""
from pathlib import Path

from transformers import AutoTokenizer

from dvd.tools.tokenizer_builder import SPECIAL_TOKENS, build_tokenizer, padded_to

TEXT = "<|im_start|>user\nDescribe <img><IMG_CONTEXT></img> 你好, the cat.<|im_end|><think>"


def test_padded_ids_decode_to_printable_text_and_encoding_is_unchanged(tmp_path: Path) -> None:
    plain = build_tokenizer()
    padded = padded_to(plain, 3000)
    assert len(plain) < 3000 and len(padded) == 3000
    assert padded.encode(TEXT) == plain.encode(TEXT)
    for token in (*SPECIAL_TOKENS, "<think>", "</think>"):
        assert padded.convert_tokens_to_ids(token) == plain.convert_tokens_to_ids(token)
    # what sampling may pick past the learned tokens: every id is non-empty printable text
    for i in range(len(plain), 3000):
        text = padded.decode([i])
        assert text.strip() and text.isprintable(), (i, text)
    padded.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(loaded) == 3000 and loaded.encode(TEXT) == plain.encode(TEXT)
    assert loaded.decode([2999]) == padded.decode([2999])
    assert loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        plain.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
