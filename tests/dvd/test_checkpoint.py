"""Checkpoint reading: both formats, sharded weights, per-half loading, and errors that name what is wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import InternVLForConditionalGeneration

from dvd.checkpoint import open_checkpoint
from dvd.errors import CheckpointError
from dvd.language_server.model import LanguageHalf
from dvd.tensor_refs import TensorSource
from dvd.tools.make_checkpoint import make_checkpoint
from dvd.vision_server.model import VisionHalf
from dvd.weights import language_tensors, vision_tensors


def test_formats_are_detected(tiny_hf: Path, tiny_github: Path) -> None:
    hf, github = open_checkpoint(tiny_hf), open_checkpoint(tiny_github)
    assert (hf.format, github.format) == ("hf", "github")
    assert hf.tokens_per_tile == github.tokens_per_tile == 256
    assert github.template == "internvl2_5" and hf.template is None
    assert hf.vision_config["hidden_size"] == github.vision_config["hidden_size"]


def test_github_and_hf_tensors_are_the_same(tiny_hf: Path, tiny_github: Path) -> None:
    readers = (lambda info, src: vision_tensors(info, src, with_flash=False), lambda info, src: language_tensors(src))
    for read in readers:
        hf = read(open_checkpoint(tiny_hf), TensorSource(tiny_hf))
        gh = read(open_checkpoint(tiny_github), TensorSource(tiny_github))
        assert hf.keys() == gh.keys()
        for name in hf:
            assert torch.equal(hf[name].read(), gh[name].read()), name


def test_each_half_holds_only_its_own_parameters(tiny_hf: Path) -> None:
    full = InternVLForConditionalGeneration.from_pretrained(str(tiny_hf))
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    vision, language = VisionHalf.from_checkpoint(tiny_hf), LanguageHalf.from_checkpoint(tiny_hf)
    assert count(vision) == count(full.model.vision_tower) + count(full.model.multi_modal_projector)
    assert count(language.model) == count(full.model.language_model) + count(full.lm_head)
    assert count(vision) + count(language.model) == count(full)
    assert not any(p.is_meta for p in vision.parameters())
    assert not any(b.is_meta for b in language.model.buffers())


def test_sharded_checkpoint_loads(tmp_path: Path, tiny_hf: Path) -> None:
    sharded = make_checkpoint(tmp_path / "sharded", preset="tiny", shard_bytes=200_000)
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    a, b = VisionHalf.from_checkpoint(sharded), VisionHalf.from_checkpoint(tiny_hf)
    pixels = torch.randn(1, 3, 448, 448)
    assert torch.equal(a(pixels), b(pixels))


def test_in_memory_names_are_read(tmp_path: Path, tiny_hf: Path) -> None:
    """Checkpoints saved with transformers' in-memory names (`model.language_model.*`) load too."""
    copy = Path(shutil.copytree(tiny_hf, tmp_path / "renamed"))
    state = load_file(str(copy / "model.safetensors"))
    renamed = {}
    for key, value in state.items():
        if key.startswith("language_model.model."):
            key = "model.language_model." + key[len("language_model.model.") :]
        elif key.startswith(("vision_tower.", "multi_modal_projector.")):
            key = "model." + key
        renamed[key] = value
    save_file(renamed, str(copy / "model.safetensors"))
    assert LanguageHalf.from_checkpoint(copy).vocab_size == LanguageHalf.from_checkpoint(tiny_hf).vocab_size
    VisionHalf.from_checkpoint(copy)


def _corrupt(tmp_path: Path, source: Path, edit) -> Path:
    copy = Path(shutil.copytree(source, tmp_path / "bad"))
    state = load_file(str(copy / "model.safetensors"))
    edit(state)
    save_file(state, str(copy / "model.safetensors"))
    return copy


def test_wrong_shape_names_file_key_and_shapes(tmp_path: Path, tiny_hf: Path) -> None:
    key = "multi_modal_projector.linear_2.weight"
    bad = _corrupt(tmp_path, tiny_hf, lambda s: s.__setitem__(key, torch.zeros(3, 5)))
    with pytest.raises(CheckpointError) as err:
        VisionHalf.from_checkpoint(bad)
    message = str(err.value)
    assert "model.safetensors" in message and key in message and "[3, 5]" in message and "[64, 64]" in message


def test_missing_tensor_is_named(tmp_path: Path, tiny_hf: Path) -> None:
    bad = _corrupt(tmp_path, tiny_hf, lambda s: s.pop("language_model.model.norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*model\.norm\.weight"):
        LanguageHalf.from_checkpoint(bad)


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlavaForConditionalGeneration"]}))
    with pytest.raises(CheckpointError, match="LlavaForConditionalGeneration"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("files", "pattern"),
    [({}, "config.json: file not found"), ({"config.json": "{not json"}, "not valid JSON"),
     ({"config.json": json.dumps({"architectures": ["InternVLChatModel"], "llm_config": {}})}, "vision_config"),
     ({"config.json": "[1, 2]"}, "config.json: expected a JSON object, got list"),
     ({"config.json": json.dumps({"architectures": ["InternVLChatModel"], "llm_config": {"model_type": "qwen3"},
                                  "vision_config": {"num_hidden_layers": 2}})}, "vision_config has no 'hidden_size'")],
)
def test_bad_config_files(tmp_path: Path, files: dict[str, str], pattern: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(CheckpointError, match=pattern):
        open_checkpoint(tmp_path)


def test_no_safetensors_is_an_error(tmp_path: Path, tiny_hf: Path) -> None:
    copy = Path(shutil.copytree(tiny_hf, tmp_path / "nosafe"))
    (copy / "model.safetensors").rename(copy / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only safetensors"):
        VisionHalf.from_checkpoint(copy)


def _sharded(tmp_path: Path) -> Path:
    return make_checkpoint(tmp_path / "sharded", preset="tiny", shard_bytes=600_000)


def test_an_index_that_is_not_json_is_named(tmp_path: Path) -> None:
    sharded = _sharded(tmp_path)
    (sharded / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: not valid JSON"):
        TensorSource(sharded)


@pytest.mark.parametrize("sharded", [False, True])
def test_a_truncated_weight_file_is_named(tmp_path: Path, tiny_hf: Path, sharded: bool) -> None:
    """A download cut short is a one-line CheckpointError naming the file, not safetensors' own exception."""
    root = _sharded(tmp_path) if sharded else Path(shutil.copytree(tiny_hf, tmp_path / "cut"))
    victim = sorted(root.glob("*.safetensors"))[-1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{victim.name}: not a complete safetensors file"):
        LanguageHalf.from_checkpoint(root)
        VisionHalf.from_checkpoint(root)
