"""Pipeline (layer) placement of the vision half over several devices: the split of the encoder layers, the
per-device module lists, the hand-offs, and outputs (features, the served frames, the greedy answer) equal
to the single-device ones exactly. Two placements on the one CPU run every split code path; a CPU + meta
placement shows the hidden states really cross to the next stage's device."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from dvd.config_file import ConfigError
from dvd.deploy.serve_config import build_serve_config
from dvd.devices import layer_ranges, split_layers
from dvd.pipeline.local import LocalPipeline
from dvd.sampling import greedy
from dvd.tools.make_checkpoint import make_checkpoint
from dvd.vision_server.config import VisionServerConfig, add_arguments
from dvd.vision_server.model import VisionHalf
from dvd.vision_server.placement import plan_stages, stage_modules
from dvd.vision_server.preprocess import PreprocessConfig, preprocess_image
from tests.conftest import encode, photo_like
from tests.vision_server.vision_harness import Harness

SPLIT = ("cpu", "cpu")


@pytest.fixture(scope="module")
def vit6b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """InternViT-6B-shaped (RMSNorm, QK-norm, no qkv bias), with ViR, in the GitHub layout."""
    return make_checkpoint(tmp_path_factory.mktemp("placement") / "6b-flash", preset="tiny-6b-vit", fmt="github",
                           flash=True)


@pytest.fixture(params=["300m", "6b_flash"])
def checkpoint(request: pytest.FixtureRequest, tiny_hf: Path, vit6b: Path) -> Path:
    return tiny_hf if request.param == "300m" else vit6b


def _images(config: PreprocessConfig) -> list[torch.Tensor]:
    return [preprocess_image(encode(photo_like(900, 500, 1)), config, max_num=6),
            preprocess_image(encode(photo_like(500, 900, 2)), config, max_num=4)]


def test_layers_split_balanced_by_count_or_as_given() -> None:
    assert split_layers(45, 2) == (23, 22)  # InternViT-6B over two devices
    assert split_layers(24, 3) == (8, 8, 8) and split_layers(5, 5) == (1,) * 5
    assert split_layers(45, 2, (24, 21)) == (24, 21)
    assert [list(r) for r in layer_ranges((2, 1))] == [[0, 1], [2]]
    with pytest.raises(ValueError, match="3 devices for a vision encoder of 2 layers"):
        split_layers(2, 3)
    with pytest.raises(ValueError, match=r"layer_split \[24, 20\] sums to 44, but the vision encoder has 45"):
        split_layers(45, 2, (24, 20))
    with pytest.raises(ValueError, match=r"layer_split \[45\] has 1 entries for 2 devices"):
        split_layers(45, 2, (45,))
    with pytest.raises(ValueError, match="every device needs at least one layer"):
        split_layers(45, 2, (45, 0))


def test_placed_features_equal_the_single_device_ones_exactly(checkpoint: Path) -> None:
    alone = VisionHalf.from_checkpoint(checkpoint)
    placed = VisionHalf.from_checkpoint(checkpoint, device=SPLIT)
    assert [s.describe() for s in placed.stages] == ["cpu (layers 0-0)", "cpu (layers 1-1)"]
    images = _images(PreprocessConfig.from_checkpoint(checkpoint))
    assert torch.equal(placed(images[0]), alone(images[0]))
    want, got = alone.encode_request(images), placed.encode_request(images)
    for a, b in zip(want, got, strict=True):
        assert a.tokens_per_tile == b.tokens_per_tile and torch.equal(a.features, b.features)
    if alone.is_flash:  # the comparison covers ViR's both paths
        assert {t for image in want for t in image.tokens_per_tile} == {64, 256}


def test_each_device_holds_its_stage_and_hooks_its_hand_off(vit6b: Path) -> None:
    half = VisionHalf.from_checkpoint(vit6b, device=SPLIT)
    names = [[name for name, _ in modules] for modules in stage_modules(half, half.stages)]
    assert names == [["vision_tower.embeddings", "vision_tower.encoder.layer.0"],
                     ["vision_tower.encoder.layer.1", "vision_tower.layernorm", "projector",
                      "pooling_before_gating", "gating", "mlp2"]]
    layers = half.vision_tower.encoder.layer
    assert len(layers[1]._forward_pre_hooks) == 1 and not layers[0]._forward_pre_hooks
    with pytest.raises(ValueError, match="layer_split"):
        plan_stages(2, SPLIT, (2, 1))


def test_hidden_states_cross_to_the_next_stages_device(tiny_hf: Path) -> None:
    """Layer 1, the norm and the projector on `meta` (shapes only), the rest on the CPU: the batch reaches
    the projector only if the hand-off moved it across."""
    half = VisionHalf.from_checkpoint(tiny_hf, device=("cpu", "meta"))
    first = {"vision_tower.embeddings", "vision_tower.encoder.layer.0"}
    for name, param in half.named_parameters():
        on_first = any(name.startswith(prefix + ".") for prefix in first)
        assert param.device.type == ("cpu" if on_first else "meta"), name
    pixels = _images(PreprocessConfig.from_checkpoint(tiny_hf))[0]
    features = half(pixels)
    assert features.device.type == "meta" and half.device.type == "meta"
    assert tuple(features.shape) == (pixels.shape[0], half.tokens_per_tile, half.info.text_width)
    assert half.where == "cpu (layers 0-0) + meta (layers 1-1)"


def test_the_greedy_answer_is_the_single_device_one(checkpoint: Path) -> None:
    pipe = LocalPipeline(checkpoint)
    data = [encode(photo_like(900, 500, 1)), encode(photo_like(500, 900, 2))]
    messages = [{"role": "user", "content": "Image-1: <image>\nImage-2: <image>\nCompare them."}]
    sampling = greedy(max_new_tokens=8, min_new_tokens=8, stop_token_ids=pipe.chat.stop_token_ids)
    want = pipe.generate(messages, data, sampling, max_num=6)
    pipe.vision = VisionHalf.from_checkpoint(checkpoint, device=SPLIT)
    got = pipe.generate(messages, data, sampling, max_num=6)
    assert got.token_ids == want.token_ids and got.tile_tokens == want.tile_tokens


def test_a_server_over_two_placements_sends_the_single_device_features(vit6b: Path) -> None:
    from dvd.v1 import common_pb2, vision_pb2

    config = PreprocessConfig.from_checkpoint(vit6b)
    data = encode(photo_like(900, 500, 1))
    pixels = preprocess_image(data, config, max_num=6)
    # One slot fills one batch exactly, so the server's batch is the reference's.
    harness = Harness(VisionServerConfig(model=vit6b, devices=SPLIT, devices_per_replica=2, cache_bytes=0,
                                         max_batch_tiles=int(pixels.shape[0]), max_wait_ms=60_000))
    try:
        counters = dict(harness.stub.Stats(common_pb2.StatsRequest()).counters)
        assert (counters["num_devices"], counters["num_replicas"]) == (2, 1)
        harness.stub.Encode(vision_pb2.EncodeRequest(request_id="placed", destination=harness.sink.address,
                                                     inputs=[vision_pb2.MediaInput(data=data, max_num=6)]))
        (_, tensor), = harness.sink.wait("placed", 1)
    finally:
        harness.close()
    (want,) = VisionHalf.from_checkpoint(vit6b).encode_request([pixels])
    assert torch.equal(tensor, want.features.to(torch.bfloat16))


def test_config_refuses_a_placement_that_does_not_fit(tiny_hf: Path) -> None:
    def refused(match: str, **fields: object) -> None:
        with pytest.raises(ValueError, match=match):
            VisionServerConfig(model=tiny_hf, **fields)  # type: ignore[arg-type]

    refused(r"devices \['cpu', 'cpu', 'cpu'\] \(3\) do not divide into replicas of devices_per_replica 2",
            devices=("cpu",) * 3, devices_per_replica=2)
    refused("repeat 'cuda:0' in two replicas", devices=("cuda:0", "cuda:1", "cuda:0", "cuda:2"),
            devices_per_replica=2)
    refused("repeat 'cpu' in two replicas", devices=SPLIT)
    refused("device 'gpu1' is not a torch device name", devices=("cuda:0", "gpu1"), devices_per_replica=2)
    refused(r"layer_split \[1\] has 1 entries for devices_per_replica 2", devices=SPLIT, devices_per_replica=2,
            layer_split=(1,))
    refused(f"{tiny_hf}: layer_split \\[2, 1\\] sums to 3, but the vision encoder has 2 layers", devices=SPLIT,
            devices_per_replica=2, layer_split=(2, 1))
    refused(f"{tiny_hf}: 3 devices for a vision encoder of 2 layers", devices=("cpu",) * 3, devices_per_replica=3)
    refused("devices_per_replica must be at least 1", devices_per_replica=0)
    config = VisionServerConfig(model=tiny_hf, devices=("cuda:0", "cuda:1", "cuda:2", "cuda:3"),
                                devices_per_replica=2, layer_split=(1, 1))
    assert config.replica_devices == (("cuda:0", "cuda:1"), ("cuda:2", "cuda:3"))


def test_flags_and_dvd_serve_config_set_the_placement(tiny_hf: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert "--devices-per-replica" in parser.format_help() and "--layer-split" in parser.format_help()
    args = parser.parse_args(["--model", str(tiny_hf), "--devices", "cpu,cpu", "--devices-per-replica", "2",
                              "--layer-split", "1,1"])
    config = VisionServerConfig.from_args(args)
    assert (config.replica_devices, config.layer_split) == ((SPLIT,), (1, 1))
    with pytest.raises(ValueError, match="--layer-split '1,x' is not a comma-separated list of layer counts"):
        VisionServerConfig.from_args(parser.parse_args(["--model", str(tiny_hf), "--layer-split", "1,x"]))
    serve = build_serve_config({"model": str(tiny_hf), "vision": {"devices": list(SPLIT), "devices_per_replica": 2,
                                                                  "layer_split": [1, 1]}}, {})
    assert serve.vision is not None and serve.vision.layer_split == (1, 1)
    with pytest.raises(ConfigError, match=r"vision: .*layer_split \[1, 2\] sums to 3"):
        build_serve_config({"model": str(tiny_hf), "vision": {"devices": list(SPLIT), "devices_per_replica": 2,
                                                              "layer_split": [1, 2]}}, {})
