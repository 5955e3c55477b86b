"""Each server's own Prometheus endpoint under `dvd serve`: listed in /v1/instances (`metrics_url`) and in
/v1/scrape_targets, parsed by prometheus_client's own parser, its counters and histograms moving as a
request passes; the gateway's /metrics current at scrape time, not one probe interval old."""

from __future__ import annotations

import base64
import json
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import encode, photo_like
from tests.serve_process import ServeProcess, metric, post_chat

IMAGE = "data:image/jpeg;base64," + base64.b64encode(encode(photo_like(900, 600, 3), "JPEG")).decode()
BODY = {"model": "tiny-hf", "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": IMAGE}}, {"type": "text", "text": "Describe the image."}]}]}


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def scrape(url: str) -> tuple[dict[str, float], dict[str, str]]:
    """An endpoint's unlabelled samples by name (a histogram's +Inf bucket included), and each family's type,
    as prometheus_client's own parser reads the text."""
    values: dict[str, float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(_get(url).decode()):
        types[family.name] = family.type
        for sample in family.samples:
            if not sample.labels or sample.labels == {"le": "+Inf"}:
                values[sample.name] = sample.value
    return values, types


def samples(url: str) -> dict[str, float]:
    return scrape(url)[0]


def moved(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after[name] - before.get(name, 0.0)


def test_each_server_serves_metrics_that_move_and_the_gateway_is_current(tiny_hf: Path) -> None:
    # Probes every 600 s: only a refresh at scrape time can make the gateway's view of the servers current.
    with ServeProcess("--model", str(tiny_hf), "--probe-interval", "600") as served:
        roster = json.loads(_get(served.http_url + "/v1/instances"))["data"]
        urls = {entry["kind"]: entry["metrics_url"] for entry in roster}
        assert sorted(urls) == ["language", "vision"] and all(u.startswith("http://127.0.0.1:") for u in urls.values())
        targets = json.loads(_get(served.http_url + "/v1/scrape_targets"))
        assert sorted((g["labels"]["dvd_role"], "http://" + g["targets"][0] + g["labels"]["__metrics_path__"])
                      for g in targets) == sorted(urls.items())
        before = {kind: samples(url) for kind, url in urls.items()}
        assert post_chat(served.http_url, BODY)[0] == 200
        after = {kind: samples(url) for kind, url in urls.items()}
        vision, language = (before["vision"], after["vision"]), (before["language"], after["language"])

        types = scrape(urls["vision"])[1] | scrape(urls["language"])[1]
        assert types["dvd_vision_encode_requests"] == "counter" and types["dvd_vision_batch_tiles"] == "histogram"
        assert types["dvd_language_kv_cache_usage_ratio"] == "gauge"
        assert types["dvd_language_step_seconds"] == "histogram"
        assert moved(*vision, "dvd_vision_encode_requests_total") == 1
        assert moved(*vision, "dvd_vision_encoder_cache_misses_total") == 1
        tiles = moved(*vision, "dvd_vision_tiles_encoded_total")
        assert tiles >= 2 and moved(*vision, "dvd_vision_batch_tiles_sum") == tiles  # 900x600: 2 tiles + thumbnail
        assert moved(*vision, "dvd_vision_encode_seconds_count") == 1
        assert moved(*vision, "dvd_vision_busy_seconds_total") > 0
        assert 0 < after["vision"]["dvd_vision_busy_fraction"] <= 1
        sent = moved(*vision, "dvd_vision_transport_bytes_sent_total")
        assert sent > 0 and moved(*language, "dvd_language_transport_bytes_received_total") == sent
        assert moved(*language, "dvd_language_requests_added_total") == 1
        assert moved(*language, "dvd_language_generation_tokens_total") == 4
        assert moved(*language, "dvd_language_step_seconds_count") >= 4  # a prefill, then a decode per token
        assert moved(*language, "dvd_language_request_seconds_count") == 1
        assert moved(*language, "dvd_language_prefix_cache_query_tokens_total") > 0
        assert after["language"]["dvd_language_kv_cache_blocks"] > 0

        assert post_chat(served.http_url, BODY)[0] == 200  # the same image: an encoder cache hit
        again = samples(urls["vision"])
        assert moved(after["vision"], again, "dvd_vision_encoder_cache_hits_total") == 1
        assert moved(after["vision"], again, "dvd_vision_tiles_encoded_total") == 0
        # The gateway shows the servers' counters as of this scrape, 600 s before its next probe.
        assert metric(served.http_url, "dvd_backend_vision0_num_requests") == 2
        assert metric(served.http_url, "dvd_backend_language0_num_requests_added") == 2
    assert served.leftover_children == []
