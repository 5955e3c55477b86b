"""Write a random-weight InternVL checkpoint: weights, config, tokenizer with a real chat template, generation and
image-processor configs, in the HF or the original GitHub format.

Presets: `tiny` (seconds to build; initializer_range 0.5 so greedy output does not collapse into one repeated token)
and `internvl3_5-1b-shaped` (InternViT-300M + Qwen3-0.6B dimensions, 448 px tiles, 256 tokens a tile). The rest of
the family, tiny, with its released structure and config fields: `tiny-6b-vit` (InternViT-6B: RMSNorm, QK-norm, no
qkv bias, drop_path_rate in the GitHub config; as in 38B), `tiny-tied` (tied embeddings and head_dim != hidden /
heads; as in 1B, 2B, 4B), `tiny-moe` (a Qwen3 MoE LLM, experts stored one tensor each as released; as in 30B-A3B and
241B-A28B), `tiny-gptoss` (GPT-OSS: alternating sliding-window (8 tokens) and full layers, attention sinks, MoE; its
GitHub config names the harmony template `internvl3_5_gpt_oss`, its tokenizer has the harmony tokens; as in
20B-A4B). Each works with `--flash`, whose HF format uses the HF (`internvl_flash`) names. The same `--seed`
gives the same weights in both formats.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken

from dvd.checkpoint import HF_FLASH_ARCHITECTURE
from dvd.prompt import HARMONY_TOKENS
from dvd.tools.tokenizer_builder import build_tokenizer, padded_to
from dvd.weights import FLASH_NAMES, GITHUB_MLP1_NAMES, VIT_NAMES

log = logging.getLogger(__name__)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "vision": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
        "text": dict(
            hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128, max_position_embeddings=8192, tie_word_embeddings=False,
        ),
        "vocab_size": None,  # the tokenizer's own size
        "initializer_range": 0.5,
        "dtype": torch.float32,
    },
    "internvl3_5-1b-shaped": {
        "vision": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
        "text": dict(
            hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
            intermediate_size=3072, max_position_embeddings=40960, tie_word_embeddings=True,
        ),
        "vocab_size": 151936,
        "initializer_range": 0.02,
        "dtype": torch.bfloat16,
    },
}
# The rest of the family, tiny: each keeps the structure and config fields of its released checkpoint.
_TINY_TEXT = PRESETS["tiny"]["text"]
PRESETS |= {
    # InternVL3.5-38B's vision half: InternViT-6B (RMSNorm, QK-norm over all heads, no qkv bias).
    "tiny-6b-vit": PRESETS["tiny"] | {
        "vision": dict(PRESETS["tiny"]["vision"], norm_type="rms_norm", use_qk_norm=True, attention_bias=False),
        "github_vision": {"model_type": "intern_vit_6b", "drop_path_rate": 0.1},
    },
    # InternVL3.5-1B / 2B / 4B's LLM fields (Qwen3-0.6B / 1.7B / 4B): tied embeddings (no lm_head in the files)
    # and a head_dim that is not hidden / heads (0.6B: 128 against 1024 / 16).
    "tiny-tied": PRESETS["tiny"] | {"text": dict(_TINY_TEXT, tie_word_embeddings=True, head_dim=32)},
    # InternVL3.5-30B-A3B / 241B-A28B: a Qwen3 MoE language half (experts stored one by one on disk).
    "tiny-moe": PRESETS["tiny"] | {
        "text": dict(
            _TINY_TEXT, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], num_experts=4,
            num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[],
            norm_topk_prob=True, use_sliding_window=False,
        ),
    },
    # InternVL3.5-GPT-OSS-20B-A4B: sliding-window and full layers alternating, attention sinks, MoE.
    # A window of 8 tokens so that every test prompt is longer than it. Its GitHub config names the harmony
    # template the model was trained with, whose tokens its tokenizer has.
    "tiny-gptoss": PRESETS["tiny"] | {
        "special_tokens": HARMONY_TOKENS, "github_template": "internvl3_5_gpt_oss",
        "text": dict(
            _TINY_TEXT, model_type="gpt_oss", architectures=["GptOssForCausalLM"], num_local_experts=4,
            num_experts_per_tok=2, intermediate_size=32, sliding_window=8, attention_bias=True,
            layer_types=["sliding_attention", "full_attention"] * (_TINY_TEXT["num_hidden_layers"] // 2),
            rms_norm_eps=1e-5,
        ),
    },
}
# Serving-benchmark presets: the real geometry (448 px tiles, 14 px patches = 1024 patches + CLS, 256
# tokens a tile after pixel shuffle, 64 with ViR) at a width a CPU serves in seconds, keeping the real
# model's ratio of ViT work per tile to LLM work per visual token (benchmarks/RESULTS.md shows the
# arithmetic): InternVL3.5-38B = InternViT-6B + Qwen3-32B, 192 GFLOP : 1; scaled 189 : 1.
# InternVL3.5-8B = InternViT-300M + Qwen3-8B, 53 : 1; scaled 57 : 1. The vocabulary is the tokenizer's
# own, so every greedy answer decodes to printable text.
PRESETS["internvl3_5-38b-scaled"] = {
    # InternViT-6B's structure (RMSNorm, QK-norm, no qkv bias), as the real 38B's vision half
    "vision": dict(hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=768,
                   norm_type="rms_norm", use_qk_norm=True, attention_bias=False),
    "github_vision": {"model_type": "intern_vit_6b", "drop_path_rate": 0.0},
    "text": dict(
        hidden_size=256, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        intermediate_size=1280, max_position_embeddings=40960, tie_word_embeddings=False,
    ),
    "vocab_size": None,
    "initializer_range": 0.5,
    "dtype": torch.float32,
}
PRESETS["internvl3_5-8b-scaled"] = {
    "vision": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=256),
    "text": dict(
        hidden_size=256, num_hidden_layers=9, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        intermediate_size=768, max_position_embeddings=40960, tie_word_embeddings=False,
    ),
    "vocab_size": None,
    "initializer_range": 0.5,
    "dtype": torch.float32,
}
FLASH_THRESHOLDS = {"flash_relative_threshold": 0.5, "flash_absolute_threshold": 0.0}


def hf_config(preset: dict[str, Any], vocab_size: int, image_token_id: int) -> dict[str, Any]:
    init = preset["initializer_range"]
    vision = dict(
        dict(image_size=[448, 448], patch_size=[14, 14], attention_bias=True, use_qk_norm=False,
             norm_type="layer_norm", layer_norm_eps=1e-6, hidden_act="gelu"),
        **preset["vision"], initializer_range=init, model_type="internvl_vision",
    )
    # Dense Qwen3 unless the preset names another model type (its fields then come from the preset).
    text = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], rope_theta=1_000_000.0,
                rms_norm_eps=1e-6, hidden_act="silu")
    text = dict(text, **preset["text"], vocab_size=vocab_size, initializer_range=init)
    if text["model_type"] == "gpt_oss":
        text.pop("rope_theta")  # GPT-OSS's own default rope (YaRN) applies, as in its released config
    return {
        "architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl",
        "vision_config": vision, "text_config": text, "image_token_id": image_token_id, "image_seq_length": 256,
        "downsample_ratio": 0.5, "projector_hidden_act": "gelu", "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default", "tie_word_embeddings": text["tie_word_embeddings"],
    }


def github_config(hf: dict[str, Any], vision_extra: dict[str, Any] | None = None,
                  template: str = "internvl2_5") -> dict[str, Any]:
    v = hf["vision_config"]
    vision = {
        "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
        "hidden_size": v["hidden_size"], "num_hidden_layers": v["num_hidden_layers"],
        "num_attention_heads": v["num_attention_heads"], "intermediate_size": v["intermediate_size"],
        "image_size": 448, "patch_size": 14, "qkv_bias": v["attention_bias"], "qk_normalization": v["use_qk_norm"],
        "norm_type": v["norm_type"], "layer_norm_eps": v["layer_norm_eps"], "hidden_act": "gelu",
        "num_channels": 3, "drop_path_rate": 0.0, "use_flash_attn": False,
        "initializer_range": v["initializer_range"], "initializer_factor": 0.1,
    } | (vision_extra or {})
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "vision_config": vision,
        "llm_config": hf["text_config"], "downsample_ratio": 0.5, "template": template,
        "ps_version": "v2", "select_layer": -1, "force_image_size": 448, "min_dynamic_patch": 1,
        "max_dynamic_patch": 12, "use_thumbnail": True, "dynamic_image_size": True,
        "use_backbone_lora": 0, "use_llm_lora": 0,
    }


def hf_state_dict(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Random weights under HF on-disk names, from transformers' own initialisation."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(InternVLConfig(**config))
    # layer scale starts at 0.1 in transformers; random ones keep every ViT layer visible in the output
    # Projector rows at unit scale: with the preset's wide init they would be ~40x the text
    # embeddings and drown every text token, making greedy output one repeated token.
    for name, param in model.named_parameters():
        if name.endswith(("lambda_1", "lambda_2")):
            torch.nn.init.normal_(param, std=config["vision_config"]["initializer_range"])
        elif name.endswith("norm.weight") and "language_model" in name:
            torch.nn.init.normal_(param, mean=1.0, std=config["text_config"]["initializer_range"])
        elif "multi_modal_projector.linear" in name and name.endswith("weight"):
            torch.nn.init.normal_(param, std=param.shape[1] ** -0.5)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("model.language_model."):
            name = "language_model.model." + name[len("model.language_model.") :]
        elif name.startswith("model."):
            name = name[len("model.") :]
        if name == "lm_head.weight" and config["tie_word_embeddings"]:
            continue
        state[name] = tensor.contiguous()
    if config["text_config"]["model_type"] == "qwen3_moe":
        state = split_experts(state)
    return state


_FUSED_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def split_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' fused Qwen3-MoE experts -> the released checkpoints' one tensor per expert and matrix
    (`mlp.experts.E.{gate,up,down}_proj.weight`), which is what `dvd.weights` and transformers read back."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        match = _FUSED_EXPERTS.match(name)
        if not match:
            out[name] = tensor
            continue
        prefix, kind = match.groups()
        for expert, matrix in enumerate(tensor):
            if kind == "down_proj":
                out[f"{prefix}.{expert}.down_proj.weight"] = matrix.contiguous()
            else:
                gate, up = matrix.chunk(2, dim=0)
                out[f"{prefix}.{expert}.gate_proj.weight"] = gate.contiguous()
                out[f"{prefix}.{expert}.up_proj.weight"] = up.contiguous()
    return out


def flash_state_dict(vision_width: int, text_width: int, init: float, seed: int) -> dict[str, torch.Tensor]:
    """ViR modules (GitHub names) with the shapes of the released InternVL3.5-Flash code."""
    c, d = vision_width, text_width
    shapes: dict[str, tuple[int, ...]] = {
        "mlp2.0.weight": (16 * c,), "mlp2.0.bias": (16 * c,),
        "mlp2.1.weight": (2 * d, 16 * c), "mlp2.1.bias": (2 * d,),
        "mlp2.4.weight": (2 * d, 2 * d), "mlp2.4.bias": (2 * d,),
        "mlp2.7.weight": (d, 2 * d), "mlp2.7.bias": (d,),
        "pooling_before_gating.query_token": (1, c),
    }
    for i in range(1, 5):
        p = f"pooling_before_gating.attn{i}"
        shapes |= {f"{p}.in_proj_weight": (3 * c, c), f"{p}.in_proj_bias": (3 * c,),
                   f"{p}.out_proj.weight": (c, c), f"{p}.out_proj.bias": (c,)}
        shapes |= {f"pooling_before_gating.norm{i}.weight": (c,), f"pooling_before_gating.norm{i}.bias": (c,)}
        b = f"gating.block{i}"
        shapes |= {f"{b}.0.weight": (4 * c, c), f"{b}.0.bias": (4 * c,), f"{b}.3.weight": (c, 4 * c),
                   f"{b}.3.bias": (c,), f"{b}.5.weight": (c,), f"{b}.5.bias": (c,)}
    shapes |= {"gating.gate.0.weight": (c,), "gating.gate.0.bias": (c,), "gating.gate.1.weight": (2, c),
               "gating.gate.1.bias": (2,)}
    gen = torch.Generator().manual_seed(seed + 1)
    state = {}
    for name, shape in shapes.items():
        is_norm_weight = len(shape) == 1 and name.endswith("weight")
        noise = torch.randn(shape, generator=gen) * (0.02 if len(shape) == 1 else init)
        state[name] = noise + 1.0 if is_norm_weight else noise
    return state


def to_hf_flash_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ViR tensors, GitHub names -> the HF (`internvl_flash`) names: named projector and gating layers, and
    each pooling attention's fused in_proj split into query / key / value."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        fused = re.match(r"^pooling_before_gating\.(attn\d)\.in_proj_(weight|bias)$", name)
        if fused:
            attn, kind = fused.groups()
            for part, rows in zip(("query", "key", "value"), tensor.chunk(3, dim=0), strict=True):
                out[f"pooling_before_gating.{attn}.{part}.{kind}"] = rows.contiguous()
            continue
        out[FLASH_NAMES.to_hf(name) or name] = tensor
    return out


_HF_TO_GITHUB_MLP1 = {hf: github for github, hf in GITHUB_MLP1_NAMES.items()}


def to_github_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF names -> GitHub (`InternVLChatModel`) names, fusing q, k, v into one qkv tensor per layer."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.startswith("vision_tower."):
            rest = name[len("vision_tower.") :]
            qkv = re.match(r"^encoder\.layer\.(\d+)\.attention\.q_proj\.(weight|bias)$", rest)
            if qkv:
                layer, kind = qkv.groups()
                parts = [state[f"vision_tower.encoder.layer.{layer}.attention.{p}_proj.{kind}"] for p in "qkv"]
                out[f"vision_model.encoder.layers.{layer}.attn.qkv.{kind}"] = torch.cat(parts)
                continue
            if re.match(r"^encoder\.layer\.\d+\.attention\.[kv]_proj\.", rest):
                continue
            out["vision_model." + (VIT_NAMES.to_github(rest) or rest)] = tensor
        elif name.startswith("multi_modal_projector."):
            module, _, param = name[len("multi_modal_projector.") :].partition(".")
            out[f"mlp1.{_HF_TO_GITHUB_MLP1[module]}.{param}"] = tensor
        elif name == "lm_head.weight":
            out["language_model.lm_head.weight"] = tensor
        else:
            out[name] = tensor
    return out


def write_weights(state: dict[str, torch.Tensor], out: Path, dtype: torch.dtype, shard_bytes: int) -> None:
    """safetensors, split into shards with an index once the total passes `shard_bytes`."""
    from safetensors.torch import save_file

    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, file)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_checkpoint(
    out: Path, preset: str = "tiny", fmt: str = "hf", flash: bool = False, seed: int = 0,
    shard_bytes: int = 2 << 30,
) -> Path:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if fmt not in ("hf", "github"):
        raise ValueError(f"unknown format {fmt!r}; choose hf or github")
    spec = PRESETS[preset]
    out.mkdir(parents=True, exist_ok=True)
    learned_tokenizer = build_tokenizer()
    # special: skipped when decoding, as the released tokenizer's are; before `learned`, so their rows stay
    learned_tokenizer.add_tokens([AddedToken(t, special=True) for t in spec.get("special_tokens", ())])
    learned = len(learned_tokenizer)
    vocab_size = spec["vocab_size"] or learned
    tokenizer = padded_to(learned_tokenizer, vocab_size)
    image_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert isinstance(image_token_id, int)  # one token in, one id out
    config = hf_config(spec, vocab_size, image_token_id)
    state = hf_state_dict(config, seed)
    # Ids past the tokenizer's learned tokens are fillers (" w<id>", tokenizer_builder._pad_vocabulary):
    # zero their embedding and LM-head rows so greedy decoding never picks one and answers in the learned
    # words (the 1b-shaped preset's 151936-entry vocabulary answered [49156, 35214, ...] before); sampling
    # may pick them, and they decode to printable text, so no answer is empty.
    for name in ("language_model.model.embed_tokens.weight", "lm_head.weight"):
        if name in state and state[name].shape[0] > learned:
            state[name][learned:] = 0
    extra: dict[str, Any] = {}
    if flash:
        init = spec["initializer_range"]
        vir = flash_state_dict(config["vision_config"]["hidden_size"], config["text_config"]["hidden_size"], init, seed)
        state |= vir if fmt == "github" else to_hf_flash_names(vir)
        extra = {"flash_mode": True, **FLASH_THRESHOLDS}
        if fmt == "hf":  # transformers' InternVL-Flash port names its own architecture
            extra |= {"architectures": [HF_FLASH_ARCHITECTURE], "model_type": "internvl_flash"}
    if fmt == "github":
        state, config = to_github_names(state), github_config(config, spec.get("github_vision"),
                                                             spec.get("github_template", "internvl2_5"))
    (out / "config.json").write_text(json.dumps(config | extra, indent=2, ensure_ascii=False))
    write_weights(state, out, spec["dtype"], shard_bytes)
    tokenizer.save_pretrained(str(out))
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    generation = {"eos_token_id": stop_ids, "pad_token_id": stop_ids[1], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    # crop_to_patches false, as transformers' InternVL conversion writes it into released HF checkpoints:
    # InternVLProcessor passes True on every call over it (vision_server/preprocess_checkpoint.py).
    processor = {
        "image_processor_type": "GotOcr2ImageProcessor", "size": {"height": 448, "width": 448},
        "crop_to_patches": False, "min_patches": 1, "max_patches": 12, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD,
        "do_convert_rgb": True, "resample": 3,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="directory to write (created if absent)")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model dimensions (default tiny)")
    parser.add_argument("--format", dest="fmt", default="hf", choices=["hf", "github"],
                        help="hf: InternVLForConditionalGeneration; github: InternVLChatModel (default hf)")
    parser.add_argument("--flash", action="store_true", help="add the ViR modules of InternVL3.5-Flash")
    parser.add_argument("--seed", type=int, default=0, help="weights are a function of the seed (default 0)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    try:
        make_checkpoint(args.out, args.preset, args.fmt, args.flash, args.seed)
    except OSError as exc:  # --out a file, or somewhere this user cannot write
        print(f"error: --out {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.preset} checkpoint ({args.fmt} format{', flash' if args.flash else ''}, seed {args.seed}) "
          f"to {args.out} in {time.perf_counter() - start:.1f}s; its weights are random")
    return 0
