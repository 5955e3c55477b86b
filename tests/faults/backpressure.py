"""A slow language server under a flood of image requests, through `dvd serve`: the language server is
frozen and thawed in a cycle (SIGSTOP for `--stopped-ms`, SIGCONT for `--running-ms`, so it runs a
quarter of the time by default) while `--clients` threads send image requests (each image distinct, so
the vision server encodes every one) for `--seconds`. Every second it samples the resident memory of
the gateway, vision and language processes and what bounds them: requests in flight at the gateway
(max_concurrency), Encode calls in flight on the vision server (max_inflight_requests), tiles it holds
(max_pending_tiles) and has queued for the batcher, bytes in the
language server's feature pool (feature_pool_bytes) and receive pool (transport.receive_pool_bytes).
Prints a table and, per process, the peak RSS of each half of the run: bounded means the second half's
peak is not above the first's (plus noise). Figures in docs/RELIABILITY.md.

    python -m tests.faults.backpressure [--model DIR] [--seconds 60] [--clients 48]
"""

from __future__ import annotations

import argparse
import base64
import signal
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

from tests.conftest import encode, photo_like
from tests.faults.helpers import servers
from tests.faults.soak import send, tree_rss_mib
from tests.serve_process import ServeProcess, metric, metrics_text

MiB = 1 << 20
POOL_BYTES = 8 * MiB  # small, so that the pools fill and back-pressure is what bounds the servers


def _request(seed: int, num_images: int = 1) -> dict:
    images = [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(
        encode(photo_like(320, 240, seed * 16 + i), "JPEG")).decode()}} for i in range(num_images)]
    return {"messages": [{"role": "user", "content": [*images, {"type": "text", "text": "What is this?"}]}],
            "max_tokens": 4, "min_tokens": 4, "temperature": 0}


def _cycle(process: psutil.Process, stopped_s: float, running_s: float, stop: threading.Event) -> None:
    """The slow language server: frozen most of the time, never long enough to miss 3 probes in a row."""
    try:
        while not stop.is_set():
            process.send_signal(signal.SIGSTOP)
            stop.wait(stopped_s)
            process.send_signal(signal.SIGCONT)
            stop.wait(running_s)
    finally:
        process.send_signal(signal.SIGCONT)


def _gauges(url: str) -> dict[str, float]:
    wanted = {"dvd_backend_requests_in_flight": "gw_inflight", "dvd_backend_vision0_num_inflight": "vis_inflight",
              "dvd_backend_vision0_num_queued_tiles": "vis_queued_tiles",
              "dvd_backend_vision0_num_pending_tiles": "vis_pending_tiles",
              "dvd_backend_vision0_num_waiting_for_tiles": "vis_waiting_for_tiles",
              "dvd_backend_language0_feature_pool_bytes": "lang_pool",
              "dvd_backend_language0_transport_pool_bytes_in_use": "lang_recv_pool",
              "dvd_backend_language0_num_streams": "lang_streams"}
    out = {}
    for line in metrics_text(url).splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            out[wanted[name]] = float(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(Path.home() / ".cache/dvd/checkpoints/tiny-hf"))
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=48)
    parser.add_argument("--max-concurrency", type=int, default=32)
    parser.add_argument("--stopped-ms", type=float, default=300)
    parser.add_argument("--running-ms", type=float, default=100)
    parser.add_argument("--images", type=int, default=1, help="images per request (1)")
    parser.add_argument("--vision-pending-tiles", type=int, default=512, help="vision.max_pending_tiles (512)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "serve.yaml"
        config.write_text(f"transport: {{receive_pool_bytes: {POOL_BYTES}, max_frame_bytes: {POOL_BYTES // 2}}}\n"
                          f"language: {{feature_pool_bytes: {POOL_BYTES}}}\n"
                          f"vision: {{max_pending_tiles: {args.vision_pending_tiles}}}\n")
        with ServeProcess("--model", args.model, "--config", str(config),
                          "--max-concurrency", str(args.max_concurrency)) as served:
            (language,) = servers(served, "language")
            assert send(served.http_url, _request(0, args.images), False, False, 120).kind == "ok"
            stop, seed, outcomes, errors = threading.Event(), iter(range(1, 1 << 30)), Counter(), Counter()
            lock = threading.Lock()

            def client() -> None:
                while not stop.is_set():
                    with lock:
                        body = _request(next(seed), args.images)
                    try:
                        result = send(served.http_url, body, False, False, 300)
                    except OSError as error:  # no answer at all: counted by kind, never hidden
                        with lock:
                            outcomes[type(error).__name__] += 1
                        continue
                    with lock:
                        outcomes[result.kind if result.kind == "ok" else f"{result.status}"] += 1
                        if result.kind == "error" and result.status != 429:
                            errors[result.error[:160]] += 1
                    if result.status == 429:
                        stop.wait(0.1)  # the push-back: a client backs off before it asks again

            slow = threading.Thread(target=_cycle, args=(language, args.stopped_ms / 1e3, args.running_ms / 1e3, stop))
            slow.start()
            clients = [threading.Thread(target=client) for _ in range(args.clients)]
            for thread in clients:
                thread.start()
            samples: list[tuple[float, dict[str, float], dict[str, float]]] = []
            start = time.monotonic()
            print(f"{'t_s':>5} {'gateway':>8} {'vision':>8} {'language':>8}  MiB RSS | gauges")
            while time.monotonic() - start < args.seconds:
                rss = {k.split(":")[0]: v for k, v in tree_rss_mib(served).items()}
                gauges = _gauges(served.http_url)
                samples.append((time.monotonic() - start, rss, gauges))
                print(f"{samples[-1][0]:5.0f} {rss['gateway']:8.0f} {rss['vision']:8.0f} {rss['language']:8.0f}  "
                      + " ".join(f"{k}={v:.0f}" for k, v in gauges.items()), flush=True)
                time.sleep(1.0)  # a sampling interval, not a synchronisation
            stop.set()
            for thread in [slow, *clients]:
                thread.join(360)
            load = psutil.getloadavg()
            half = len(samples) // 2
            print(f"\nrequests: {dict(outcomes)}; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
            for message, count in errors.most_common(5):
                print(f"  {count} x {message}")
            for name in ("gateway", "vision", "language"):
                first = max(s[1][name] for s in samples[:half])
                second = max(s[1][name] for s in samples[half:])
                print(f"{name:9s} RSS peak first half {first:.0f} MiB, second half {second:.0f} MiB")
            for key in samples[0][2]:
                print(f"{key:16s} max {max(s[2].get(key, 0) for s in samples):.0f}")
            print("in flight at the end:", metric(served.http_url, "dvd_backend_requests_in_flight"))


if __name__ == "__main__":
    main()
