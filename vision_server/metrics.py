"""The vision server's Prometheus metrics (`dvd_vision_*`), served on its own port (dvd/metrics.py).

Counters and gauges are the engine's own stats (`VisionEngine.stats`, what gRPC `Stats` answers) read at
scrape time through `STATS`; histograms are observed as work happens: each forward pass's tiles and time
(`observe_batch`, from the batcher's device threads) and each Encode's time and its inputs' preprocessing
(`observe_encode`). The busy fraction is the model replicas' time inside forward passes over the last
10 s (`dvd_vision_busy_fraction`); `dvd_vision_busy_seconds_total` is the same as a counter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from dvd.metrics import SECONDS_BUCKETS, SIZE_BUCKETS, ServerMetrics, counter, gauge

STATS = (
    counter("num_requests", "dvd_vision_encode_requests", "Encode calls admitted"),
    counter("num_requests_failed", "dvd_vision_encode_requests_failed", "Encode calls that failed"),
    counter("num_requests_busy", "dvd_vision_encode_requests_busy",
            "Encode calls refused at max_inflight_requests (the gateway tries another replica)"),
    gauge("num_inflight", "dvd_vision_encode_requests_in_flight", "Encode calls being served now"),
    gauge("num_queued_tiles", "dvd_vision_queued_tiles", "Tiles waiting in the batcher's queue for a forward pass"),
    gauge("num_pending_tiles", "dvd_vision_pending_tiles",
          "Tiles admitted (worst case per Encode), of max_pending_tiles"),
    gauge("num_waiting_for_tiles", "dvd_vision_encode_requests_waiting",
          "Encode calls waiting for room under max_pending_tiles"),
    counter("num_tiles_preprocessed", "dvd_vision_tiles_preprocessed", "Tiles decoded and tiled"),
    counter("num_batch_tiles", "dvd_vision_tiles_encoded", "Tiles through the ViT (their rate: tiles/s)"),
    counter("num_batches", "dvd_vision_batches", "ViT forward passes"),
    counter("num_mixed_batches", "dvd_vision_mixed_batches", "Forward passes holding tiles of several requests"),
    counter("num_tiles_compressed", "dvd_vision_vir_tiles_compressed",
            "Tiles ViR sent through the compressing projector"),
    counter("num_worker_errors", "dvd_vision_forward_errors", "Forward passes that failed"),
    gauge("num_replicas", "dvd_vision_model_replicas", "Model replicas (device groups) this server runs"),
    counter("num_slots_sent", "dvd_vision_frames_sent", "Feature frames (one per image or video frame) sent"),
    counter("num_tokens_sent", "dvd_vision_feature_tokens_sent", "Feature rows (image tokens) sent"),
    counter("num_bytes_sent", "dvd_vision_transport_bytes_sent", "Feature bytes handed to the transport"),
    counter("transport_num_connections", "dvd_vision_transport_connections", "Transport connections made"),
    counter("transport_num_dropped_connections", "dvd_vision_transport_dropped_connections",
            "Transport connections lost"),
    counter("num_cache_hits", "dvd_vision_encoder_cache_hits", "Inputs served from the encoder cache"),
    counter("num_cache_misses", "dvd_vision_encoder_cache_misses", "Inputs the encoder cache did not hold"),
    counter("num_cache_evictions", "dvd_vision_encoder_cache_evictions", "Encoder cache entries evicted"),
    gauge("num_cache_entries", "dvd_vision_encoder_cache_entries", "Encoder cache entries"),
    gauge("cache_bytes", "dvd_vision_encoder_cache_bytes", "Bytes the encoder cache holds"),
    gauge("cache_hit_rate", "dvd_vision_encoder_cache_hit_ratio", "Encoder cache hits over lookups since start"),
    counter("busy_s", "dvd_vision_busy_seconds", "Model replicas' seconds inside forward passes (summed)"),
    gauge("busy_fraction", "dvd_vision_busy_fraction",
          "Fraction of the model replicas' time inside forward passes over the last 10 s"),
)


class VisionMetrics(ServerMetrics):
    """One vision server's registry: its stats by `STATS`, histograms, and the devices' busy clock."""

    def __init__(self, read_stats: Callable[[], dict[str, float]], num_replicas: int) -> None:
        super().__init__(STATS, read_stats, workers=num_replicas)
        h = self.histogram
        self.batch_tiles = h("dvd_vision_batch_tiles", "Tiles in one ViT forward pass", SIZE_BUCKETS)
        self.forward_seconds = h("dvd_vision_forward_seconds", "One forward pass (ViT + projector or gate)",
                                 SECONDS_BUCKETS)
        self.encode_seconds = h("dvd_vision_encode_seconds", "Encode calls, arrival to answer", SECONDS_BUCKETS)
        self.preprocess_seconds = h("dvd_vision_preprocess_seconds",
                                    "An image's (or video frame's) arrival to its tiles handed to the batcher",
                                    SECONDS_BUCKETS)

    def observe_batch(self, num_tiles: int, start: float, end: float) -> None:
        """One forward pass of `num_tiles` tiles from `start` to `end` (time.monotonic), on a device thread."""
        self.busy.add(start, end)
        self.batch_tiles.observe(num_tiles)
        self.forward_seconds.observe(end - start)

    def observe_encode(self, elapsed_s: float, preprocessed_ms: Iterable[float]) -> None:
        """One Encode answered after `elapsed_s`; its fresh slots' preprocessing stamps (ms since arrival)."""
        self.encode_seconds.observe(elapsed_s)
        for ms in preprocessed_ms:
            self.preprocess_seconds.observe(ms / 1e3)
