"""`dvd plan`: weights per half from the safetensors headers, KV bytes per token from the config, capacity,
the largest batch, device placement, and refusals that say what does not fit."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open

from dvd.checkpoint import open_checkpoint
from dvd.cli import main
from dvd.deploy.plan import (
    VisionParts,
    kv_bytes_per_token,
    make_plan,
    parameter_counts,
    parse_devices,
    parse_size,
    place_vision,
    vision_parts,
)
from dvd.hub import safetensors_headers
from dvd.tools.make_checkpoint import make_checkpoint


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("plan") / "moe", preset="tiny-moe", fmt="github")


def test_sizes_and_devices_parse() -> None:
    assert parse_size("80GiB") == 80 << 30 and parse_size("1.5 MB") == 1_500_000
    assert parse_devices("2x80GiB,40GiB") == [80 << 30, 80 << 30, 40 << 30]
    with pytest.raises(ValueError, match="not a number with a unit"):
        parse_size("lots")


def test_plan_counts_each_half_and_the_kv_cache(moe: Path) -> None:
    vision = language = 0
    with safe_open(str(moe / "model.safetensors"), framework="pt") as handle:
        for key in sorted(handle.keys()):
            numel = handle.get_slice(key).get_shape()
            count = 1
            for n in numel:
                count *= n
            if key.startswith("language_model."):
                language += count
            else:
                vision += count
    plan = make_plan(moe, [64 << 20, 64 << 20], reserve_bytes=1 << 20, request_tokens=1000)
    assert (plan.vision_weight_bytes, plan.language_weight_bytes) == (2 * vision, 2 * language)
    # 4 layers x 2 KV heads x 16 dims x (K and V) x 2 bytes
    assert plan.kv_bytes_per_token == kv_bytes_per_token(open_checkpoint(moe), 2) == 4 * 2 * 16 * 2 * 2
    usable = int((64 << 20) * 0.9) - (1 << 20)
    assert plan.language_devices == [0] and plan.vision_device == 1 and not plan.vision_shares_device
    assert plan.kv_capacity_tokens == (usable - plan.language_weight_bytes) // plan.kv_bytes_per_token
    assert plan.largest_batch == plan.kv_capacity_tokens // 1000


def test_plan_spans_devices_and_refuses_what_does_not_fit(moe: Path) -> None:
    language = make_plan(moe, [1 << 30], reserve_bytes=0).language_weight_bytes
    small = (language + 16 * 512) // 2 + 1024  # two devices hold the weights and one 16-token request's KV
    plan = make_plan(moe, [small, small, 1 << 30], utilisation=1.0, reserve_bytes=0, request_tokens=16)
    assert plan.language_devices == [0, 1] and plan.vision_device == 2
    with pytest.raises(ValueError, match=r"the vision half's .* do not fit device 2"):
        make_plan(moe, [small] * 3, utilisation=1.0, reserve_bytes=0, request_tokens=16)
    with pytest.raises(ValueError, match="the language half needs"):
        make_plan(moe, [1 << 16], utilisation=1.0, reserve_bytes=0)


def test_plan_command(moe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", str(moe), "--devices", "2x1GiB", "--reserve", "100MiB",
                 "--vision-tiles-per-s", "40", "--language-requests-per-s", "12"]) == 0
    out = capsys.readouterr().out
    assert "KV cache: 512.0 B a token" in out and "vision replicas per language replica: 3" in out


@pytest.mark.parametrize(("args", "problem"), [
    (["--devices", "lots"], "size 'lots' is not a number with a unit"),
    (["--devices", "1MiB"], "the language half needs"),
    (["--model", "{empty}", "--devices", "80GiB"], "config.json: file not found"),
    (["--model", "{qwen3}", "--devices", "80GiB"], "unsupported architecture 'Qwen3ForCausalLM'"),
])
def test_a_bad_value_or_checkpoint_is_one_line_and_exit_2(moe: Path, tmp_path: Path, args: list[str], problem: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "qwen3").mkdir()  # a plain LLM checkpoint, not an InternVL one
    (tmp_path / "qwen3" / "config.json").write_text('{"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}')
    args = [a.format(empty=tmp_path / "empty", qwen3=tmp_path / "qwen3") for a in args]
    assert main(["plan", "--model", str(moe), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and problem in err and err.count("\n") == 1, err


def test_a_vision_half_too_big_for_one_device_is_layer_placed(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    vit6b = make_checkpoint(tmp_path / "6b", preset="tiny-6b-vit", fmt="github", flash=True)
    parts = vision_parts(safetensors_headers(vit6b))
    vision, _ = parameter_counts(safetensors_headers(vit6b))
    assert len(parts.layers) == 2 and parts.first + sum(parts.layers) + parts.last == vision
    stages = [2 * n for n in parts.stage_counts([1, 1])]  # BF16 bytes on each of two devices
    small = max(stages)
    assert small < 2 * vision  # the whole half does not fit one such device
    plan = make_plan(vit6b, [1 << 30, small, small], utilisation=1.0, reserve_bytes=0, request_tokens=16)
    assert plan.language_devices == [0] and plan.vision_devices == [1, 2] and plan.vision_device == 1
    assert plan.vision_layer_split == [1, 1] and plan.vision_stage_bytes == stages
    assert sum(plan.vision_stage_bytes) == plan.vision_weight_bytes
    one = make_plan(vit6b, [1 << 30, 1 << 30], reserve_bytes=0, request_tokens=16)
    assert one.vision_devices == [1] and one.vision_layer_split == [2]
    with pytest.raises(ValueError, match=r"do not fit device 1, nor layer-placed over devices 1-2"):
        make_plan(vit6b, [1 << 30, small - 2, small - 2], utilisation=1.0, reserve_bytes=0, request_tokens=16)
    assert main(["plan", "--model", str(vit6b), "--devices", f"1GiB,{small}B,{small}B", "--utilisation", "1",
                 "--reserve", "0B", "--request-tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert "vision half does not fit one device: its encoder layers placed over devices [1, 2]" in out
    assert "device 1: embeddings + layers 0-0" in out and "device 2: layers 1-1 + norm, projector" in out
    assert "dvd vision --devices <these 2> --devices-per-replica 2 --layer-split 1,1" in out


def test_vision_placement_takes_the_fewest_devices_balanced_else_filled() -> None:
    parts = VisionParts(first=10, layers=(10,) * 6, last=30)
    assert place_vision(parts, [200, 200], 1) == [6]
    assert place_vision(parts, [60, 60], 1) == [3, 3]  # 40 and 60: the server's default split
    assert place_vision(parts, [50, 50], 1) == [4, 2]  # balanced leaves 60 on the last: fill the first
    assert place_vision(parts, [30, 30], 1) is None
    assert place_vision(parts, [30, 30, 60], 1) == [2, 2, 2]
