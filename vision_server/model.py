"""The vision half: InternViT + pixel shuffle + MLP projector (+ ViR for Flash checkpoints), loaded alone.

The ViT and projector are transformers' own InternVL modules, so the features are the ones
`InternVLForConditionalGeneration.get_image_features` computes; only their tensors are read.

The work is split in stages so a batcher can run them on tiles of many requests: `vit` (the
expensive part, batched), `gate` (ViR's routing probability per tile), `project` (mlp1 to 256
tokens, or for ViR-compressed tiles mlp2 to 64). `encode_request` runs them for one request, the
way the released Flash `chat()` does, computing only the chosen projector path for each tile.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import InternVLConfig, InternVLVisionConfig
from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector, InternVLVisionModel

from dvd.checkpoint import CheckpointInfo, open_checkpoint
from dvd.tensor_refs import TensorSource, load_module, parameters_on_meta
from dvd.vision_server.placement import Stage, place, plan_stages
from dvd.vision_server.preprocess import PreprocessConfig, normalize
from dvd.vision_server.vir import CrossAttentionPooling, Gating, compressed_projector, decide_routes
from dvd.weights import vision_tensors


def pixel_shuffle(features: torch.Tensor, scale: float, ps_version: str = "v2") -> torch.Tensor:
    """InternVL's pixel shuffle on [tiles, w, h, c]: trades spatial size for channels by 1/scale^2.

    `v2` swaps h and w back afterwards (all InternVL3.5 checkpoints); `v1` (early InternVL) does not.
    """
    n, w, h, c = features.size()
    features = features.view(n, w, int(h * scale), int(c / scale))
    features = features.permute(0, 2, 1, 3).contiguous()
    features = features.view(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    if ps_version != "v1":
        features = features.permute(0, 2, 1, 3).contiguous()
    return features


@dataclass(frozen=True)
class EncodedImage:
    """One image's features as they leave the vision half: [sum(tokens_per_tile), D] rows, tile after tile."""

    features: torch.Tensor
    tokens_per_tile: tuple[int, ...]
    gate_probs: torch.Tensor | None = None  # ViR's p per tile (fp32, CPU) on Flash checkpoints

    @property
    def num_tokens(self) -> int:
        return int(self.features.shape[0])

    @property
    def uniform_tokens_per_tile(self) -> int:
        """What a feature header's single `tokens_per_tile` can say: the count when every tile has it
        (256, or 64 when ViR compressed them all), 0 when ViR mixed 64- and 256-token tiles. The
        row count (`features.shape[0]`) is always the slot's exact N."""
        return uniform_tokens(self.tokens_per_tile)


def uniform_tokens(tokens_per_tile: Sequence[int]) -> int:
    return tokens_per_tile[0] if tokens_per_tile and len(set(tokens_per_tile)) == 1 else 0


class VisionHalf(torch.nn.Module):
    """ViT + projector (+ ViR) of one checkpoint. `forward(pixel_values)` -> [tiles, tokens_per_tile, llm_width]
    through mlp1 for every tile; `encode_request` applies ViR's routing on Flash checkpoints."""

    def __init__(self, info: CheckpointInfo) -> None:
        super().__init__()
        self.info = info
        self.stages: tuple[Stage, ...] = ()  # where its encoder layers run, set by `from_checkpoint`
        # uint8 tiles are normalised on the device with the checkpoint's own mean and std
        preprocess = PreprocessConfig.from_checkpoint(info.path)
        self.pixel_mean, self.pixel_std = preprocess.mean, preprocess.std
        vision_config = InternVLVisionConfig(**info.vision_config)
        vision_config._attn_implementation = "sdpa"
        full_config = InternVLConfig(
            vision_config=vision_config,
            text_config=info.text_config,
            downsample_ratio=info.downsample_ratio,
            projector_hidden_act=info.projector_hidden_act,
        )
        self.vision_tower = InternVLVisionModel(vision_config)
        self.projector = InternVLMultiModalProjector(full_config)
        if info.flash is not None:
            # Module names are the checkpoint's own, so `vision_tensors(with_flash=True)` maps 1:1.
            width = info.vision_width
            self.pooling_before_gating = CrossAttentionPooling(width)
            self.gating = Gating(width)
            self.mlp2 = compressed_projector(width, info.text_width, round(self.compressed_scale**-2))

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | Path | CheckpointInfo, dtype: torch.dtype = torch.float32,
        device: str | Sequence[str] = "cpu", layer_split: Sequence[int] = (),
    ) -> VisionHalf:
        """Load the half onto `device`, or with several devices place its encoder layers over them
        (`vision_server/placement.py`; `layer_split`: layers per device, default balanced)."""
        info = checkpoint if isinstance(checkpoint, CheckpointInfo) else open_checkpoint(checkpoint)
        devices = (device,) if isinstance(device, str) else tuple(device)
        with parameters_on_meta():
            half = cls(info)
        refs = vision_tensors(info, TensorSource(info.path), with_flash=info.flash is not None)
        load_module(half, refs, dtype)
        if len(devices) == 1 and not layer_split:
            half.stages = plan_stages(len(half.vision_tower.encoder.layer), devices)
            return half.to(devices[0]).eval()
        half.stages = place(half, devices, layer_split)
        return half.eval()

    @property
    def is_flash(self) -> bool:
        return self.info.flash is not None

    @property
    def compressed_scale(self) -> float:
        """ViR's pixel shuffle factor for the 64-token path: the normal ratio squared (0.5 -> 0.25)."""
        return self.info.downsample_ratio**2

    @property
    def tokens_per_tile(self) -> int:
        return self.info.tokens_per_tile

    @property
    def compressed_tokens_per_tile(self) -> int:
        side = self.info.image_size // self.info.patch_size
        return int(side * side * self.compressed_scale * self.compressed_scale)

    def tokens_for(self, compressed: bool) -> int:
        return self.compressed_tokens_per_tile if compressed else self.tokens_per_tile

    @property
    def device(self) -> torch.device:
        """Where the projector (and ViR) run and features come out: the last device of a placed half."""
        return next(self.projector.parameters()).device

    @property
    def where(self) -> str:
        """The device, or for a placed half its devices and their layers (for logs and thread names)."""
        if len(self.stages) <= 1:
            return str(self.device)
        return " + ".join(stage.describe() for stage in self.stages)

    @torch.inference_mode()
    def vit(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, s, s] -> the selected layer's tokens without CLS, as a grid [tiles, side, side, C].
        uint8 tiles (preprocess_tiles) go to the device as they are, a quarter of float pixels' bytes, and are
        normalised there; float pixel values are taken as normalised already."""
        param = next(self.vision_tower.embeddings.parameters())  # the first stage's device
        if pixel_values.dtype == torch.uint8:
            tiles = pixel_values.to(device=param.device, non_blocking=True)
            pixel_values = normalize(tiles, self.pixel_mean, self.pixel_std)
        pixel_values = pixel_values.to(device=param.device, dtype=param.dtype)
        layer = self.info.vision_feature_layer
        out = self.vision_tower(pixel_values=pixel_values, output_hidden_states=layer != -1)
        hidden = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
        hidden = hidden[:, 1:, :]  # drop CLS
        side = int(hidden.shape[1] ** 0.5)
        return hidden.reshape(hidden.shape[0], side, side, -1)

    @torch.inference_mode()
    def gate(self, grid: torch.Tensor) -> torch.Tensor:
        """ViR's p = prob[:, 0] per tile (fp32 on the CPU), from `vit`'s grid. Flash checkpoints only."""
        tokens = grid.to(self.device).reshape(grid.shape[0], -1, grid.shape[-1])
        return self.gating(self.pooling_before_gating(tokens))[:, 0].to(device="cpu", dtype=torch.float32)

    @torch.inference_mode()
    def project(self, grid: torch.Tensor, compressed: bool = False) -> torch.Tensor:
        """`vit`'s grid -> [tiles, tokens, D]: mlp1 after pixel shuffle, or mlp2 after the 0.25 one."""
        scale = self.compressed_scale if compressed else self.info.downsample_ratio
        hidden = pixel_shuffle(grid.to(self.device), scale, self.info.ps_version)
        hidden = hidden.reshape(hidden.shape[0], -1, hidden.shape[-1])
        return self.mlp2(hidden) if compressed else self.projector(hidden)

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.project(self.vit(pixel_values))

    @torch.inference_mode()
    def encode_request(self, images: Sequence[torch.Tensor]) -> list[EncodedImage]:
        """One request's images (pixel tiles each) -> features per image, ViR routed over all its tiles."""
        return encode_requests(self, [images])[0]

    def routes(self, probs: torch.Tensor) -> torch.Tensor:
        """ViR's decision for one request's tiles (all False on non-Flash checkpoints)."""
        if self.info.flash is None:
            return torch.zeros(probs.numel(), dtype=torch.bool)
        return decide_routes(probs, self.info.flash)


def project_tiles(half: VisionHalf, grid: torch.Tensor, routes: torch.Tensor) -> list[torch.Tensor]:
    """Per tile [tokens, D], each through its chosen projector only (one batched call per route)."""
    out: list[torch.Tensor | None] = [None] * grid.shape[0]
    for compressed in (False, True):
        index = torch.nonzero(routes == compressed).flatten().tolist()
        if index:
            projected = half.project(grid[index], compressed)
            for row, i in enumerate(index):
                out[i] = projected[row]
    return [t for t in out if t is not None]


@torch.inference_mode()
def encode_requests(half: VisionHalf, requests: Sequence[Sequence[torch.Tensor]]) -> list[list[EncodedImage]]:
    """Several requests' images (pixel tiles each) in one ViT pass -> per request, features per image. On Flash
    checkpoints each request's routes are decided over its own tiles only, as the released `chat()` does (a
    tile's route never depends on who shared its batch), and each image keeps its tiles' gate values."""
    counts = [[int(p.shape[0]) for p in images] for images in requests]
    grid = half.vit(torch.cat([p for images in requests for p in images]))
    probs = half.gate(grid) if half.is_flash else None
    out, row = [], 0
    for tiles in counts:
        n = sum(tiles)
        if probs is None:
            out.append(assemble(half, grid[row:row + n], torch.zeros(n, dtype=torch.bool), tiles))
        else:
            mine = probs[row:row + n]
            images = assemble(half, grid[row:row + n], half.routes(mine), tiles)
            out.append([replace(image, gate_probs=p) for image, p in zip(images, mine.split(tiles), strict=True)])
        row += n
    return out


def assemble(half: VisionHalf, grid: torch.Tensor, routes: torch.Tensor, counts: Sequence[int]) -> list[EncodedImage]:
    """Project a request's tiles and cut them into images of `counts` tiles each."""
    tiles = project_tiles(half, grid, routes)
    images, start = [], 0
    for count in counts:
        chosen = routes[start : start + count].tolist()
        features = torch.cat(tiles[start : start + count])
        images.append(EncodedImage(features, tuple(half.tokens_for(c) for c in chosen)))
        start += count
    return images
