"""Send one chat request to a running `dvd serve` over gRPC and print the answer as it streams.

Example: dvd client --image cat.jpg --prompt "Describe the image." --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default="127.0.0.1:50051", help="gateway gRPC address (default 127.0.0.1:50051)")
    parser.add_argument("--prompt", required=True, help="the user's message; <image> marks where an image goes")
    parser.add_argument("--image", action="append", default=[], metavar="FILE", help="an image file (repeatable)")
    parser.add_argument("--system", help="system message")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the likeliest tokens whose "
                                                                    "probabilities sum to this; 1 keeps all")
    parser.add_argument("--seed", type=int, help="sampling seed, for reproducible sampled output (default: none)")
    parser.add_argument("--timeout", type=float, default=600.0, help="deadline in seconds (default 600)")
    parser.add_argument("--ca-cert", metavar="PEM", type=Path,
                        help="connect over TLS, trusting this CA (or the gateway's own certificate): for a gateway "
                             "started with --tls-cert")
    parser.epilog = "The API key, if the gateway needs one, is read from the environment variable DVD_API_KEY."
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")


def run(args: argparse.Namespace) -> int:
    import grpc

    from dvd.pipeline.client import Completion, GenerationClient

    try:
        images = [Path(name).read_bytes() for name in args.image]
        root_certificates = args.ca_cert.read_bytes() if args.ca_cert else None
    except OSError as exc:
        print(f"error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    # with placeholders, images go where they are; without, before the text (as the model card does)
    pieces = args.prompt.split("<image>")
    if len(pieces) > 1:
        if len(pieces) - 1 != len(images):
            print(f"error: the prompt has {len(pieces) - 1} <image> placeholders but {len(images)} images",
                  file=sys.stderr)
            return 2
        content: list = [x for i, piece in enumerate(pieces) for x in ((images[i - 1],) if i else ()) + (piece,)]
    else:
        content = [*images, args.prompt]
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": content}]
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}
    if args.seed is not None:
        sampling["seed"] = args.seed
    out = Completion()
    try:
        api_key = os.environ.get("DVD_API_KEY") or None  # read now, when the command runs
        with GenerationClient(args.address, timeout_s=args.timeout, api_key=api_key,
                              root_certificates=root_certificates) as client:
            for response in client.stream(messages, **sampling):
                out.add(response)
                if not args.json:
                    print(response.text, end="", flush=True)
    except grpc.RpcError as exc:
        return _failed(exc, args, answered=bool(out.text))
    if args.json:
        print(json.dumps(out.__dict__, ensure_ascii=False))
    else:
        print()
        print(f"[{out.finish_reason}] " + "  ".join(f"{k} {v:.1f} ms" for k, v in out.timings_ms.items()),
              file=sys.stderr)
    return 0


def _failed(exc: Any, args: argparse.Namespace, answered: bool) -> int:
    """The call's error (a grpc.RpcError) on stderr, after the streamed text's last line; exit code 1. `answered`:
    some text came back (so a gateway was there)."""
    import grpc

    ended = "\n" if answered and not args.json else ""
    print(f"{ended}error: {exc.code().name}: {exc.details()}", file=sys.stderr)
    if exc.code() == grpc.StatusCode.UNAVAILABLE and not answered:
        print(f"no gateway answers at {args.address}: is `dvd serve` (or `dvd gateway`) running there? --address "
              "names its gRPC address (host:port; `dvd serve --grpc-port`, default 50051)", file=sys.stderr)
        if args.ca_cert is None:  # plain text to a TLS port reads only "Socket closed"
            print("(a gateway started with --tls-cert needs --ca-cert)", file=sys.stderr)
    return 1
