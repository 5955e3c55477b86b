"""Time to first token of the language engine when images arrive one after another, and of turn 2 of a chat.

1. **Prefill as features arrive** vs **waiting for all** (how every serving system did it before): one
   request of N images; image i's frame arrives `(i + 1) x --encode-ms` after the request (the vision
   server encoding its images one after another). Streaming hands the engine the text up to the first
   image at once and each image with the text after it when its frame comes; waiting adds the whole
   prompt when the last frame came. TTFT is counted from the request's arrival; also reported: the time
   and the tokens the engine computed from the last frame to the first token (the count does not
   depend on the machine's load).
2. **Prefix cache**: turn 2 of a chat about one image (turn 1's prompt, its answer, a new question),
   with the cache on and off; the frame is there at once. TTFT of turn 2 only.

The engine runs in this process, one request at a time; the prefix cache is off in part 1 so repeats do
not hit it. Image features are random rows (the model's widths); frames' delays are simulated.
Run: `python -m dvd.benchmarks.streaming --preset internvl3_5-1b-shaped` (see --help).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from dvd.benchmarks.engine import DTYPES
from dvd.checkpoint import open_checkpoint
from dvd.language_server.config import EngineConfig
from dvd.language_server.engine import Engine
from dvd.language_server.model import LanguageHalf
from dvd.language_server.request import EngineRequest, PromptPiece
from dvd.pipeline.detokenize import answer_text
from dvd.prompt import ChatFormat
from dvd.sampling import greedy
from dvd.tools.checkpoint_cache import default_cache_dir, ensure_checkpoint

SYSTEM = "You are a helpful assistant that looks closely at every picture and answers precisely. "


def _image_prompt(chat: ChatFormat, num_images: int, rows: int, text_words: int) -> tuple[list[int], list[int]]:
    """Expanded prompt ids and each image's first row position; `text_words` words between images."""
    words = " ".join(["describe the shapes and colours you see"] * max(1, text_words // 7))
    content = "".join(f"Image-{i + 1}: <image>\n{words}\n" for i in range(num_images)) + "Compare them."
    ids = chat.expand(chat.build([{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}],
                                 num_images), [rows] * num_images)
    return ids, [i + 1 for i, t in enumerate(ids) if t == chat.image_start_id]


def _drive(engine: Engine, rid: str, events: list[tuple[float, object]]) -> tuple[float, float, int]:
    """Applies each (at seconds, action) when due while stepping the engine. Returns seconds from the start
    and from the last event to the request's first token, and the tokens the engine computed in between
    (what was left to prefill once the last frame was there: a count the machine's load cannot skew)."""
    start = time.perf_counter()
    pending = list(events)
    last_at, tokens_at_last = 0.0, 0
    while True:
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            pending.pop(0)[1]()  # type: ignore[operator]
            if not pending:
                last_at, tokens_at_last = time.perf_counter() - start, engine.stats.num_batch_tokens
        if engine.has_work:
            for output in engine.step():
                if output.request_id == rid and output.new_token_ids:
                    first = time.perf_counter() - start
                    tokens = engine.stats.num_batch_tokens - tokens_at_last
                    engine.abort(rid)  # TTFT is all we time here
                    engine.run_until_done()
                    return first, first - last_at, tokens
        elif pending:
            time.sleep(max(0.0, pending[0][0] - (time.perf_counter() - start)))  # the simulated vision server
        else:
            raise RuntimeError(f"request {rid} ended without a token")


def streaming_ttft(engine: Engine, chat: ChatFormat, num_images: int, rows: int, encode_s: float,
                   text_words: int, stream: bool, rid: str) -> tuple[float, float, int]:
    hidden = engine.hidden_size
    ids, starts = _image_prompt(chat, num_images, rows, text_words)
    features = [torch.randn(rows, hidden, dtype=torch.bfloat16) * 0.05 for _ in range(num_images)]
    sampling = greedy(max_new_tokens=2)
    if not stream:
        whole = EngineRequest(rid, ids, sampling, images=list(zip(starts, features, strict=True)))
        return _drive(engine, rid, [(num_images * encode_s, lambda: engine.add(whole))])
    bounds = [*starts, len(ids)]
    events: list[tuple[float, object]] = [(0.0, lambda: engine.add(EngineRequest(rid, ids[:starts[0]], sampling,
                                                                                  prompt_complete=False)))]
    for k in range(num_images):
        piece = PromptPiece(ids[bounds[k]:bounds[k + 1]], [(starts[k], features[k])], complete=k == num_images - 1)
        events.append(((k + 1) * encode_s, lambda piece=piece: engine.extend(rid, piece)))
    return _drive(engine, rid, events)


def chat_turn2_ttft(engine: Engine, chat: ChatFormat, rows: int, rid: str) -> tuple[float, int]:
    """Turn 1 (untimed), then turn 2's TTFT; and the hit tokens turn 2 got."""
    hidden = engine.hidden_size
    image = torch.randn(rows, hidden, dtype=torch.bfloat16) * 0.05
    key = rid.encode()  # a fresh image per measurement: only turn 2 can hit turn 1
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "<image>\nWhat is in it?"}]
    ids = chat.expand(chat.build(messages, 1), [rows])
    start = ids.index(chat.image_start_id) + 1
    engine.add(EngineRequest(f"{rid}-1", ids, greedy(max_new_tokens=8), images=[(start, image)],
                             image_keys={start: key}))
    answer = [t for o in engine.run_until_done()[f"{rid}-1"] for t in o.new_token_ids]
    messages += [{"role": "assistant", "content": answer_text(chat, answer)},
                 {"role": "user", "content": "And which colour covers most of it?"}]
    ids = chat.expand(chat.build(messages, 1), [rows])
    start = ids.index(chat.image_start_id) + 1
    hits = engine.stats.num_prefix_cache_hit_tokens
    request = EngineRequest(f"{rid}-2", ids, greedy(max_new_tokens=2), images=[(start, image)],
                            image_keys={start: key})
    ttft, _, _ = _drive(engine, f"{rid}-2", [(0.0, lambda: engine.add(request))])
    return ttft, engine.stats.num_prefix_cache_hit_tokens - hits


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dvd bench streaming", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="internvl3_5-1b-shaped", help="make-checkpoint preset")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where checkpoints are built and kept")
    parser.add_argument("--images", default="1,2,4", help="comma-separated images per request")
    parser.add_argument("--rows", type=int, default=256, help="feature rows per image (256 = one tile)")
    parser.add_argument("--encode-ms", type=float, default=300.0, help="simulated encode time per image")
    parser.add_argument("--text-words", type=int, default=28, help="words of text after each image")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per setting (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--max-batch-tokens", type=int, default=512)
    parser.add_argument("--linear-backend", choices=["torch", "onednn"], default="torch")
    parser.add_argument("--json", dest="as_json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.rows < 1 or args.encode_ms < 0:
        parser.error("--repeats and --rows must be >= 1, --encode-ms >= 0")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    path = ensure_checkpoint(args.preset, cache_dir=args.cache_dir or default_cache_dir())
    chat = ChatFormat(open_checkpoint(path))
    language = LanguageHalf.from_checkpoint(path, dtype=DTYPES[args.dtype])
    say = (lambda *a: None) if args.as_json else print

    def engine(prefix_cache: bool) -> Engine:
        # room for the largest request here (4 images of 256 rows and their text) and no more: KV is big
        return Engine(language, EngineConfig(block_size=args.block_size, num_blocks=4096 // args.block_size,
                                             max_batch_tokens=args.max_batch_tokens, linear_backend=args.linear_backend,
                                             enable_prefix_cache=prefix_cache))

    plain = engine(False)  # part 1: no prefix cache, so repeats do not hit each other
    streaming_ttft(plain, chat, 1, args.rows, 0.0, args.text_words, True, "warmup")
    part1 = []
    for n in (int(x) for x in args.images.split(",")):
        runs: dict[str, list[tuple[float, float, int]]] = {"wait_for_all": [], "streaming": []}
        for r in range(args.repeats):  # the two modes interleaved, so a change of load hits both alike
            for mode, got in runs.items():
                got.append(streaming_ttft(plain, chat, n, args.rows, args.encode_ms / 1e3, args.text_words,
                                          mode == "streaming", f"{mode}-{n}-{r}"))
        row: dict[str, float] = {"images": n}
        for mode, got in runs.items():
            row[f"ttft_{mode}_ms"] = statistics.median(t for t, _, _ in got) * 1e3
            row[f"after_last_frame_{mode}_ms"] = statistics.median(a for _, a, _ in got) * 1e3
            row[f"tokens_after_last_frame_{mode}"] = got[-1][2]
        row["reduction"] = 1 - row["ttft_streaming_ms"] / row["ttft_wait_for_all_ms"]
        part1.append(row)
        say(f"{n} image(s), frames every {args.encode_ms:.0f} ms: TTFT waiting for all "
            f"{row['ttft_wait_for_all_ms']:7.0f} ms, streaming {row['ttft_streaming_ms']:7.0f} ms "
            f"({row['reduction']:.0%} lower); after the last frame "
            f"{row['after_last_frame_wait_for_all_ms']:.0f} vs {row['after_last_frame_streaming_ms']:.0f} ms, "
            f"{row['tokens_after_last_frame_wait_for_all']} vs {row['tokens_after_last_frame_streaming']} tokens")
    del plain
    part2: dict[str, dict[str, float]] = {}
    for on in (False, True):
        chat_engine = engine(on)  # fresh images each repeat: turn 2 can only hit its own turn 1
        turns = [chat_turn2_ttft(chat_engine, chat, args.rows, f"chat-{on}-{r}") for r in range(args.repeats)]
        del chat_engine
        part2["on" if on else "off"] = {"ttft_turn2_ms": statistics.median(t for t, _ in turns) * 1e3,
                                        "hit_tokens": turns[-1][1]}
    say(f"chat turn 2 with an image: TTFT prefix cache off {part2['off']['ttft_turn2_ms']:.0f} ms, on "
        f"{part2['on']['ttft_turn2_ms']:.0f} ms ({part2['on']['hit_tokens']} prompt tokens from the cache)")
    load = {"start": load_start, "end": os.getloadavg()[0]}
    say(f"load average (1 min): {load['start']:.2f} at start, {load['end']:.2f} at end")
    if args.as_json:
        print(json.dumps({"model": args.preset, "dtype": args.dtype, "threads": args.threads, "rows": args.rows,
                          "encode_ms": args.encode_ms, "load_average_1m": load, "streaming_prefill": part1,
                          "prefix_cache_turn2": part2}, indent=2))
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
