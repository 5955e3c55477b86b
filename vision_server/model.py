"""The vision half: InternViT + pixel shuffle + MLP projector, loaded alone from a checkpoint.

The ViT and projector are transformers' own InternVL modules, so the features are the ones
`InternVLForConditionalGeneration.get_image_features` computes; only their tensors are read.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import InternVLConfig, InternVLVisionConfig
from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector, InternVLVisionModel

from dvd.checkpoint import CheckpointInfo, open_checkpoint
from dvd.weights import TensorSource, load_module, parameters_on_meta, vision_tensors


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


class VisionHalf(torch.nn.Module):
    """ViT + projector of one checkpoint. `forward(pixel_values)` -> [tiles, tokens_per_tile, llm_width]."""

    def __init__(self, info: CheckpointInfo) -> None:
        super().__init__()
        self.info = info
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

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | Path | CheckpointInfo, dtype: torch.dtype = torch.float32, device: str = "cpu"
    ) -> VisionHalf:
        info = checkpoint if isinstance(checkpoint, CheckpointInfo) else open_checkpoint(checkpoint)
        with parameters_on_meta():
            half = cls(info)
        load_module(half, vision_tensors(info, TensorSource(info.path), with_flash=False), dtype)
        return half.to(device).eval()

    @property
    def tokens_per_tile(self) -> int:
        return self.info.tokens_per_tile

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        param = next(self.parameters())
        pixel_values = pixel_values.to(device=param.device, dtype=param.dtype)
        layer = self.info.vision_feature_layer
        out = self.vision_tower(pixel_values=pixel_values, output_hidden_states=layer != -1)
        hidden = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
        hidden = hidden[:, 1:, :]  # drop CLS
        side = int(hidden.shape[1] ** 0.5)
        hidden = hidden.reshape(hidden.shape[0], side, side, -1)
        hidden = pixel_shuffle(hidden, self.info.downsample_ratio, self.info.ps_version)
        hidden = hidden.reshape(hidden.shape[0], -1, hidden.shape[-1])
        return self.projector(hidden)
