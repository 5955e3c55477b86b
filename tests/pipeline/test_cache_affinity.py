"""Cache-affinity routing under `dvd serve`: with two vision replicas and a workload repeating 8 images (two
clients at once, so a load-only router would spread each image over both caches), the encoder cache hit rate
is at least 90% of one replica's, both replicas serve, and a request whose two images live on different
replicas is split between them and answers exactly as one replica does."""

from __future__ import annotations

import base64
import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dvd.pipeline.affinity import AffinityRing, content_key
from dvd.pipeline.replicas import Replica
from dvd.v1 import vision_pb2
from tests.conftest import encode, photo_like
from tests.pipeline.test_server_metrics import samples
from tests.serve_process import ServeProcess, metric, post_chat

POOL = [encode(photo_like(448, 448, seed), "JPEG") for seed in range(16)]
ROUNDS = 4


def _body(*images: bytes) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(i).decode()}}
             for i in images]
    return {"model": "tiny-hf", "max_tokens": 3, "temperature": 0,
            "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "Compare them."}]}]}


def _vision(served: ServeProcess) -> list[dict]:
    with urllib.request.urlopen(served.http_url + "/v1/instances", timeout=30) as response:
        return [e for e in json.loads(response.read())["data"] if e["kind"] == "vision"]


def _homes(members: list[Replica]) -> list[Replica | None]:
    return [AffinityRing().home(content_key(vision_pb2.MediaInput(data=image)), members) for image in POOL]


def _workload_images(members: list[Replica]) -> list[bytes]:
    """8 images of the pool with homes on both replicas: the ring hashes the replicas' addresses (ports the
    kernel chose), so the first 8 may all live on one; then the last is swapped for one living elsewhere."""
    homes = _homes(members)
    images = POOL[:8]
    if all(home is homes[0] for home in homes[:8]):
        images[-1] = next(image for image, home in zip(POOL, homes, strict=True) if home is not homes[0])
    return images


def _run_workload(served: ServeProcess, images: list[bytes]) -> tuple[float, list[float]]:
    """The workload's encoder cache hit rate over every vision replica, and each replica's Encode count."""
    order = [images[i % len(images)] for i in range(len(images) * ROUNDS)]
    with ThreadPoolExecutor(2) as clients:
        statuses = list(clients.map(lambda image: post_chat(served.http_url, _body(image))[0], order))
    assert statuses == [200] * len(order)
    scraped = [samples(entry["metrics_url"]) for entry in _vision(served)]
    hits = sum(s["dvd_vision_encoder_cache_hits_total"] for s in scraped)
    misses = sum(s["dvd_vision_encoder_cache_misses_total"] for s in scraped)
    return hits / (hits + misses), [s["dvd_vision_encode_requests_total"] for s in scraped]


def test_two_replicas_keep_the_hit_rate_of_one_and_a_split_request_answers_the_same(tiny_hf: Path) -> None:
    with ServeProcess("--model", str(tiny_hf), "--vision-replicas", "2") as two:
        members = [Replica(kind="vision", address=e["address"], healthy=True) for e in _vision(two)]
        images = _workload_images(members)
        rate, encodes = _run_workload(two, images)
        assert all(n > 0 for n in encodes), encodes  # both replicas serve: affinity spreads the images
        homes = _homes(members)
        pair = next((POOL[0], image) for image, home in zip(POOL, homes, strict=True) if home is not homes[0])
        status, split = post_chat(two.http_url, _body(*pair))
        assert status == 200 and metric(two.http_url, "dvd_backend_num_encode_splits") == 1
    with ServeProcess("--model", str(tiny_hf)) as one:
        single_rate, _ = _run_workload(one, images)
        status, alone = post_chat(one.http_url, _body(*pair))
        assert status == 200
    assert single_rate == (ROUNDS - 1) / ROUNDS  # the first round misses, every later one hits
    assert rate >= 0.9 * single_rate, (rate, single_rate)
    assert split["choices"][0]["message"]["content"] == alone["choices"][0]["message"]["content"]
    assert split["usage"] == alone["usage"]
