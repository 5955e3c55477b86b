"""Latency of a small request while maximal ones are being refused, for a source tree.

    python scripts/measure_hostile_latency.py TREE [SECONDS] [MODEL]

Spawns `python -m dvd serve` (disaggregated, defaults) in TREE, then times a small chat request
(`max_tokens` 1) over and over: first alone, then while two other clients send, in a loop, the
largest requests the default limits let in or just past them: a 2,000,000-character prompt, a
262,000-character prompt (about the most the gateway tokenizes, max_prompt_chars 262,144; the
language server then refuses it as longer than its context), and a 30 MiB JSON body (under the
32 MiB body limit). Prints the small
request's median, p95 and max latency in each phase, and what the big ones were answered.
"""
import json
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

tree = sys.argv[1]
seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 20.0
model = sys.argv[3] if len(sys.argv) > 3 else str(Path.home() / ".cache/dvd/checkpoints/tiny-hf")
proc = subprocess.Popen([sys.executable, "-m", "dvd", "serve", "--model", model, "--port", "0", "--grpc-port", "0"],
                        cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
url = ""
for line in proc.stdout:
    if "OpenAI API at" in line:
        url = line.split("OpenAI API at ")[1].split("/v1")[0]
    if "dvd serve: ready" in line:
        break
threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep the pipe drained


def post(body: bytes, timeout: float = 300) -> int:
    request = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as err:
        err.read()
        return err.code
    except OSError:
        return -1


def chat(text: str) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": 1}).encode()


small = chat("hi")
big = {"2M-char prompt": chat("word " * 400_000), "262k-char prompt": chat("x " * 131_000),
       "30 MiB body": chat("y" * (30 << 20))}


def measure(duration: float) -> list[float]:
    out, end = [], time.monotonic() + duration
    while time.monotonic() < end:
        start = time.monotonic()
        assert post(small) == 200
        out.append((time.monotonic() - start) * 1e3)
    return out


def report(name: str, ms: list[float]) -> None:
    ms = sorted(ms)
    print(f"{name}: n={len(ms)} median {statistics.median(ms):.1f} ms, p95 {ms[int(0.95 * (len(ms) - 1))]:.1f} ms, "
          f"max {ms[-1]:.1f} ms", flush=True)


try:
    measure(2.0)  # warm
    report("small request alone", measure(seconds))
    stop, answers = threading.Event(), Counter()

    def attacker(bodies: list[tuple[str, bytes]]) -> None:
        while not stop.is_set():
            for name, body in bodies:
                start = time.monotonic()
                status = post(body)
                answers[f"{name} -> {status}"] += 1
                answers[f"{name} seconds"] += time.monotonic() - start

    items = list(big.items())
    threads = [threading.Thread(target=attacker, args=(items[i::2],)) for i in range(2)]
    for t in threads:
        t.start()
    report("small request while big ones are refused", measure(seconds))
    stop.set()
    for t in threads:
        t.join()
    for name in big:
        mine = {k: v for k, v in answers.items() if k.startswith(name) and "->" in k}
        count = sum(mine.values())
        statuses = ", ".join(k.split("-> ")[1] + f" x{v}" for k, v in mine.items())
        print(f"  {name}: answered {statuses}; {answers[name + ' seconds'] / max(count, 1):.2f} s each", flush=True)
finally:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
