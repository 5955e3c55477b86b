"""The language half: the checkpoint's LLM alone (transformers' own `*ForCausalLM`: dense Qwen3,
Qwen3-MoE, GPT-OSS; `dvd.checkpoint.SUPPORTED_TEXT_MODELS`), taking token ids plus image features.

Image features enter through the embedding layer: the rows of `inputs_embeds` at image-context
positions are replaced by the features, exactly as the monolithic model does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
from transformers.generation.streamers import BaseStreamer

from dvd.checkpoint import CheckpointInfo, open_checkpoint
from dvd.errors import InvalidFieldError, InvalidRequestError, PromptTooLongError
from dvd.sampling import SamplingParams
from dvd.tensor_refs import JoinedRef, ShardRef, TensorRef, TensorSource, load_module, parameters_on_meta
from dvd.weights import language_tensors


def generation_config(sampling: SamplingParams, pad_token_id: int | None) -> GenerationConfig:
    """transformers' spelling of `sampling`, for the one-request path. transformers has no OpenAI presence or
    frequency penalty: those are the engine's (language_server/sampling.py), refused here rather than dropped."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(sampling, name):
            raise InvalidFieldError(f"{name} is applied by the serving engine only (dvd serve), not by the "
                                    "one-request path", name)
    sample = sampling.temperature > 0
    return GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        min_new_tokens=sampling.min_new_tokens,
        do_sample=sample,
        temperature=sampling.temperature if sample else None,
        top_p=sampling.top_p if sample else None,
        top_k=(sampling.top_k or None) if sample else None,
        min_p=(sampling.min_p or None) if sample else None,
        repetition_penalty=sampling.repetition_penalty,
        eos_token_id=list(sampling.stop_token_ids) or None,
        pad_token_id=pad_token_id,
    )


def meta_model(info: CheckpointInfo) -> torch.nn.Module:
    """The checkpoint's `*ForCausalLM` with its parameters on the meta device (no memory yet)."""
    text = dict(info.text_config)
    config = AutoConfig.for_model(text.pop("model_type"), **text)
    # GPT-OSS has no SDPA path (its attention sinks are not expressible there): its own eager one runs.
    model_class: Any = AutoModelForCausalLM._model_mapping[type(config)]
    config._attn_implementation = "sdpa" if model_class._supports_sdpa else "eager"
    with parameters_on_meta():
        return AutoModelForCausalLM.from_config(config)


def fill(model: torch.nn.Module, refs: Mapping[str, TensorRef | JoinedRef | ShardRef], dtype: torch.dtype,
         device: str | torch.device) -> None:
    """Read `refs` into a meta model, each tensor straight onto `device`, and put it in eval mode."""
    load_module(model, refs, dtype, optional=lambda name: name == "lm_head.weight", device=device)
    if "lm_head.weight" not in refs:  # tied embeddings: the checkpoint stores the matrix once
        tied: Any = model  # transformers' attributes, which nn.Module types as Tensor | Module
        tied.lm_head.weight = tied.get_input_embeddings().weight
    model.to(device).eval()  # the buffers (rotary frequencies), computed on the CPU


class LanguageHalf:
    """The LLM of one checkpoint, with features scattered into its input embeddings."""

    def __init__(self, model: torch.nn.Module, info: CheckpointInfo | None = None) -> None:
        """`info`: the checkpoint it came from (None for a model built in memory, as `dvd doctor` does)."""
        # a transformers *ForCausalLM: nn.Module types its attributes as Tensor | Module, so Any
        self.model: Any = model
        self.info = info

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | Path | CheckpointInfo, dtype: torch.dtype = torch.float32, device: str = "cpu"
    ) -> LanguageHalf:
        info = checkpoint if isinstance(checkpoint, CheckpointInfo) else open_checkpoint(checkpoint)
        model = meta_model(info)
        fill(model, language_tensors(TensorSource(info.path)), dtype, device)
        return cls(model, info)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def context_limit(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", None) or 1 << 62)

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[0]

    def embed(self, input_ids: list[int], image_token_id: int, features: torch.Tensor | None) -> torch.Tensor:
        """[1, len, D] input embeddings with `features` ([n, D], in order) at the image-context positions."""
        if any(not 0 <= t < self.vocab_size for t in input_ids):
            bad = next(t for t in input_ids if not 0 <= t < self.vocab_size)
            raise InvalidRequestError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        ids = torch.tensor([input_ids], device=self.device)
        embeds = self.model.get_input_embeddings()(ids)
        mask = ids[0] == image_token_id
        num_slots = int(mask.sum())
        rows = None if features is None else features.reshape(-1, features.shape[-1])
        num_rows = 0 if rows is None else rows.shape[0]
        if num_slots != num_rows:
            raise InvalidRequestError(f"prompt has {num_slots} image-context tokens but {num_rows} feature rows")
        if rows is not None and num_rows:
            embeds[0, mask] = rows.to(device=self.device, dtype=self.dtype)
        return embeds

    @torch.inference_mode()
    def generate(
        self,
        input_ids: list[int],
        image_token_id: int,
        features: torch.Tensor | None,
        sampling: SamplingParams,
        pad_token_id: int | None = None,
        streamer: BaseStreamer | None = None,
    ) -> list[int]:
        """One request, start to finish; returns the new token ids (stop token included if hit)."""
        if not input_ids:
            raise InvalidRequestError("prompt is empty")
        limit = self.context_limit
        if len(input_ids) >= limit:
            raise PromptTooLongError(len(input_ids), limit)
        if len(input_ids) + sampling.max_new_tokens > limit:  # stop at the context's end, as a server would
            sampling = replace(sampling, max_new_tokens=limit - len(input_ids),
                               min_new_tokens=min(sampling.min_new_tokens, limit - len(input_ids)))
        embeds = self.embed(input_ids, image_token_id, features)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        out = self.model.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device),
            generation_config=generation_config(sampling, pad_token_id),
            streamer=streamer,
        )
        return out[0].tolist()
