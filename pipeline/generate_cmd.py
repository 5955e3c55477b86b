"""Answer one prompt in this process: images -> vision half -> BF16 features -> language half.

Examples:
  dvd generate --model ckpt --image cat.jpg --prompt "Describe the image."
  dvd generate --model ckpt --image a.png --image b.png --prompt "Image-1: <image>\\nImage-2: <image>\\nCompare."
  dvd generate --model ckpt --history chat.json --prompt "And then?" --json
  dvd generate --model ckpt --video clip.mp4 --num-segments 8 --prompt "What happens in this video?"

A video's frames are sampled as the model card's load_video does (one tile a frame) and each gets its
own slot; without `<image>` placeholders the prompt is prefixed with `Frame1: <image>\n...`, as the
card does. On InternVL3.5-Flash checkpoints ViR picks 256 or 64 tokens per tile; `--json` reports
them (`tile_tokens`, per image and tile).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dvd.errors import DvdError

if TYPE_CHECKING:
    from dvd.pipeline.local import LocalPipeline

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (HF or GitHub InternVL format) or Hugging "
                                                       "Face Hub id (org/name)")
    parser.add_argument("--revision", default="", help="the Hub id's branch, tag or commit (default main)")
    parser.add_argument("--prompt", required=True, help="the user's message; <image> marks where an image goes")
    parser.add_argument("--image", action="append", default=[], metavar="FILE",
                        help="an image file, in prompt order (repeat for several)")
    parser.add_argument("--video", metavar="FILE", help="a video file; its sampled frames follow the images' slots")
    parser.add_argument("--num-segments", type=int, default=8,
                        help="frames sampled from --video, as the model card's load_video (default 8)")
    parser.add_argument("--history", type=Path, metavar="JSON",
                        help="earlier turns: a JSON list of {role, content} messages to put before the prompt")
    parser.add_argument("--system", help="system message (default: the checkpoint's own)")
    parser.add_argument("--thinking", action="store_true", help="use the model card's thinking-mode system prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate")
    parser.add_argument("--min-new-tokens", type=int, default=0, help="tokens generated before an end token may stop "
                                                                        "the answer (default 0)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the likeliest tokens whose "
                                                                    "probabilities sum to this; 1 keeps all")
    parser.add_argument("--top-k", type=int, default=0, help="0 means no top-k cut")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="transformers' repetition penalty over prompt and output; 1 is none")
    parser.add_argument("--seed", type=int, help="sampling seed, for reproducible sampled output")
    parser.add_argument("--max-num", type=int, help="most tiles per image (default: the checkpoint's)")
    parser.add_argument("--device", default="cpu", help="torch device for both halves (default cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="model dtype (default float32 on cpu, else bfloat16)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _messages(args: argparse.Namespace, num_frames: int = 0) -> list[dict]:
    messages: list[dict] = []
    if args.system is not None:
        messages.append({"role": "system", "content": args.system})
    if args.history is not None:
        try:
            history = json.loads(args.history.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DvdError(f"--history {args.history}: {exc}") from None
        if not isinstance(history, list):
            raise DvdError(f"--history {args.history}: expected a JSON list of messages")
        messages += history
    prompt = args.prompt
    if num_frames and "<image>" not in prompt:
        from dvd.vision_server.video import frame_prompt

        # The frames' slots come after the images'; spell the images' out too, as the card would.
        images = len(args.image)
        prefix = "<image>\n" if images == 1 else "".join(f"Image-{i + 1}: <image>\n" for i in range(images))
        prompt = prefix + frame_prompt(num_frames) + prompt
    messages.append({"role": "user", "content": prompt})
    return messages


def _video_frames(args: argparse.Namespace, pipeline: LocalPipeline) -> list[torch.Tensor]:
    if args.video is None:
        return []
    from dvd.vision_server.video import load_video

    try:
        data = Path(args.video).read_bytes()
    except OSError as exc:
        raise DvdError(f"--video {args.video}: {exc.strerror or exc}") from None
    return list(load_video(data, pipeline.preprocess_config, num_segments=args.num_segments).pixels)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from dvd.devices import require_available
    from dvd.hub import resolve_model
    from dvd.pipeline.local import LocalPipeline
    from dvd.sampling import SamplingParams

    try:
        require_available(args.device)
        model = resolve_model(args.model, args.revision).path
        images = []
        for name in args.image:
            try:
                images.append(Path(name).read_bytes())
            except OSError as exc:
                raise DvdError(f"--image {name}: {exc.strerror or exc}") from None
        dtype = DTYPES[args.dtype] if args.dtype else (torch.float32 if args.device == "cpu" else torch.bfloat16)
        pipeline = LocalPipeline(model, device=args.device, dtype=dtype)
        frames = _video_frames(args, pipeline)
        sampling = SamplingParams(
            max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, temperature=args.temperature,
            top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
            stop_token_ids=pipeline.chat.stop_token_ids,
        )
        result = pipeline.generate(_messages(args, len(frames)), images, sampling, max_num=args.max_num,
                                   thinking=args.thinking, frames=frames)
    except (DvdError, ValueError) as exc:  # ModelNameError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({
            "text": result.text,
            "token_ids": result.token_ids,
            "num_prompt_tokens": result.num_prompt_tokens,
            "num_tiles": result.num_tiles,
            "tokens_per_tile": result.tokens_per_tile,
            "tile_tokens": result.tile_tokens,
            "timings_ms": {k: round(v, 3) for k, v in result.timings_ms.items()},
        }, ensure_ascii=False))
    else:
        print(result.text)
        timings = "  ".join(f"{k[:-3]} {v:.1f} ms" for k, v in result.timings_ms.items())
        print(f"[{result.num_prompt_tokens} prompt tokens, {len(result.token_ids)} new; tiles {result.num_tiles}] "
              f"{timings}", file=sys.stderr)
    return 0
