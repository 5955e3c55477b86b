"""The language server's Prometheus metrics (`dvd_language_*`), served on its own port (dvd/metrics.py).

Counters and gauges are the server's own stats (`LanguageServer.counters`, what gRPC `Stats` answers: the
engine's, the feature pool's, the transport's) read at scrape time through `STATS`; histograms are
observed as work happens: each engine step's time, tokens and requests (`observe_step`, on the engine's
thread) and each finished request's stages on this server (`observe_request`). The busy fraction is the
engine thread's time inside steps over the last 10 s (`dvd_language_busy_fraction`).
"""

from __future__ import annotations

from collections.abc import Callable

from dvd.language_server.generation import FirstTokenStamps
from dvd.metrics import SECONDS_BUCKETS, SIZE_BUCKETS, ServerMetrics, counter, gauge

_ENGINE = (
    counter("num_requests_added", "dvd_language_requests_added", "Requests that entered the engine"),
    counter("num_requests_finished", "dvd_language_requests_finished", "Requests the engine finished (any reason)"),
    counter("num_requests_aborted", "dvd_language_requests_aborted", "Requests aborted in the engine"),
    gauge("num_running", "dvd_language_requests_running", "Requests in the running batch"),
    gauge("num_waiting", "dvd_language_requests_waiting", "Requests waiting for admission to the batch"),
    gauge("num_awaiting_features", "dvd_language_requests_awaiting_features",
          "Requests in the engine whose prompt waits for an image's frame"),
    gauge("num_waiting_for_features", "dvd_language_generate_waiting_for_features",
          "Generate calls waiting for their features"),
    gauge("num_streams", "dvd_language_generate_streams", "Generate calls streaming tokens"),
    counter("num_steps", "dvd_language_steps", "Engine steps (forward passes)"),
    counter("num_batch_tokens", "dvd_language_batch_tokens", "Tokens run through the model (prompts and decodes)"),
    counter("num_output_tokens", "dvd_language_generation_tokens", "Tokens generated"),
    counter("num_preemptions", "dvd_language_preemptions", "Requests preempted for KV blocks"),
    gauge("num_kv_blocks", "dvd_language_kv_cache_blocks", "KV cache blocks"),
    gauge("num_kv_blocks_used", "dvd_language_kv_cache_blocks_used", "KV cache blocks held by requests"),
    gauge("num_kv_blocks_cached", "dvd_language_kv_cache_blocks_cached", "Free KV blocks kept for prefix hits"),
    gauge("kv_cache_usage", "dvd_language_kv_cache_usage_ratio", "KV cache blocks used over blocks"),
    gauge("kv_cache_bytes", "dvd_language_kv_cache_bytes", "KV cache size in bytes"),
    counter("num_prefix_cache_query_tokens", "dvd_language_prefix_cache_query_tokens",
            "Prompt tokens looked up in the prefix cache"),
    counter("num_prefix_cache_hit_tokens", "dvd_language_prefix_cache_hit_tokens",
            "Prompt tokens found in the prefix cache"),
    counter("num_prefix_cache_evictions", "dvd_language_prefix_cache_evictions", "Prefix cache blocks evicted"),
    gauge("prefix_cache_hit_rate", "dvd_language_prefix_cache_hit_ratio", "Prefix cache hit over query tokens"),
    gauge("num_kv_held_requests", "dvd_language_kv_held_requests",
          "P/D, a prefill server: handed-off requests whose KV blocks are held until the decode server has them"),
    gauge("num_kv_blocks_held", "dvd_language_kv_held_blocks", "P/D, a prefill server: KV blocks held for hand-offs"),
    counter("num_kv_holds_released", "dvd_language_kv_holds_released",
            "P/D, a prefill server: held hand-offs released (acknowledged or aborted)"),
    counter("num_kv_holds_expired", "dvd_language_kv_holds_expired",
            "P/D, a prefill server: held hand-offs freed by the hold timeout"),
    gauge("num_feature_bytes_held", "dvd_language_engine_feature_bytes", "Feature bytes held by engine requests"),
)
# P/D (kv_transfer.py, kv_shards.py): the KV blocks a prefill server pushes and a decode server takes in, and the paths
# a tensor-parallel group's KV took (a tp=1 server counts none)
_KV = (
    counter("num_kv_blocks_exported", "dvd_language_kv_blocks_exported",
            "P/D, a prefill server: KV blocks pushed to decode servers"),
    counter("num_kv_blocks_imported", "dvd_language_kv_blocks_imported",
            "P/D, a decode server: KV blocks taken into its cache from prefill servers"),
    gauge("num_kv_incoming", "dvd_language_kv_incoming_requests",
          "P/D, a decode server: requests holding blocks while their KV is still arriving"),
    counter("num_kv_frames_received", "dvd_language_kv_frames_received",
            "P/D, a decode server: KV frames and hand-offs received"),
    counter("num_kv_frames_dropped", "dvd_language_kv_frames_dropped",
            "P/D, a decode server: KV frames dropped on arrival (their request had ended or failed here)"),
    counter("num_kv_layouts_refused", "dvd_language_kv_layouts_refused",
            "P/D, a decode server: KV frames of another layout refused (their request fails)"),
    gauge("num_kv_requests_arriving", "dvd_language_kv_requests_arriving",
          "P/D, a decode server: requests in its KV intake (frames or a Generate waiting for the rest)"),
    gauge("kv_intake_bytes", "dvd_language_kv_intake_bytes",
          "P/D, a decode server: bytes of KV frames in its intake, not yet in the engine"),
    gauge("num_kv_holds", "dvd_language_kv_hold_timers",
          "P/D, a prefill server: held hand-offs whose hold timeout is running"),
    counter("num_kv_exports_shard_to_shard", "dvd_language_kv_exports_shard_to_shard",
            "P/D with tensor parallel, a prefill server: exports each rank pushed to its own decode rank"),
    counter("num_kv_exports_through_rank0", "dvd_language_kv_exports_through_rank0",
            "P/D with tensor parallel, a prefill server: exports gathered to rank 0 and pushed whole"),
    counter("num_kv_imports_shard_to_shard", "dvd_language_kv_imports_shard_to_shard",
            "P/D with tensor parallel, a decode server: imports each rank took from its own prefill rank"),
    counter("num_kv_imports_through_rank0", "dvd_language_kv_imports_through_rank0",
            "P/D with tensor parallel, a decode server: imports rank 0 scattered to its ranks"),
)
_FEATURES = (
    counter("feature_pool_num_frames_received", "dvd_language_feature_frames_received", "Feature frames pooled"),
    counter("feature_pool_num_frames_refused", "dvd_language_feature_frames_refused",
            "Feature frames refused (late, out of range, no room)"),
    counter("feature_pool_num_frames_resent", "dvd_language_feature_frames_resent",
            "A retried Encode's frames for images already here (freed)"),
    counter("feature_pool_num_orphans_evicted", "dvd_language_feature_orphans_evicted",
            "Frames no Generate asked for, evicted"),
    counter("feature_pool_num_requests_timed_out", "dvd_language_features_timed_out",
            "Requests whose features did not arrive in time"),
    gauge("feature_pool_bytes", "dvd_language_feature_pool_bytes", "Feature bytes pooled, waiting for requests"),
    gauge("num_feature_pool_entries", "dvd_language_feature_pool_requests", "Requests with pooled features"),
    counter("transport_num_frames", "dvd_language_transport_frames_received", "Frames the transport received"),
    counter("transport_num_bytes", "dvd_language_transport_bytes_received", "Feature bytes the transport received"),
    counter("transport_num_connections", "dvd_language_transport_connections", "Transport connections accepted"),
    counter("transport_num_dropped_connections", "dvd_language_transport_dropped_connections",
            "Transport connections dropped (protocol errors, timeouts)"),
    counter("transport_num_refused_handshakes", "dvd_language_transport_refused_handshakes",
            "Senders refused at the handshake (version or token)"),
    counter("transport_num_rejected_frames", "dvd_language_transport_rejected_frames", "Duplicate frames refused"),
    gauge("transport_pool_bytes_in_use", "dvd_language_transport_pool_bytes_in_use",
          "Receive pool bytes holding frames"),
    gauge("transport_pool_capacity_bytes", "dvd_language_transport_pool_capacity_bytes", "Receive pool budget"),
    counter("busy_s", "dvd_language_busy_seconds", "Seconds the engine thread spent inside steps"),
    gauge("busy_fraction", "dvd_language_busy_fraction", "Fraction of the last 10 s the engine spent inside steps"),
)
STATS = _ENGINE + _KV + _FEATURES


class LanguageMetrics(ServerMetrics):
    """One language server's registry: its stats by `STATS`, histograms, and the engine's busy clock."""

    def __init__(self, read_stats: Callable[[], dict[str, float]]) -> None:
        super().__init__(STATS, read_stats)
        h = self.histogram
        self.step_seconds = h("dvd_language_step_seconds", "One engine step", SECONDS_BUCKETS)
        self.step_tokens = h("dvd_language_step_tokens", "Tokens in one engine step", SIZE_BUCKETS)
        self.step_requests = h("dvd_language_step_requests", "Requests in one engine step", SIZE_BUCKETS)
        self.features_wait_seconds = h("dvd_language_features_wait_seconds",
                                       "Generate's arrival to its last image's features handed over", SECONDS_BUCKETS)
        self.queue_seconds = h("dvd_language_queue_seconds",
                               "A request's entry into the engine to its first prefill chunk", SECONDS_BUCKETS)
        self.first_token_seconds = h("dvd_language_time_to_first_token_seconds",
                                     "Generate's arrival to its first token, on this server", SECONDS_BUCKETS)
        self.request_seconds = h("dvd_language_request_seconds", "Generate's arrival to its finish", SECONDS_BUCKETS)

    def observe_step(self, num_requests: int, num_tokens: int, start: float, end: float) -> None:
        """One engine step that ran a batch, from `start` to `end` (time.monotonic), on the engine's thread."""
        self.busy.add(start, end)
        self.step_seconds.observe(end - start)
        self.step_tokens.observe(num_tokens)
        self.step_requests.observe(num_requests)

    def observe_request(self, stamps: FirstTokenStamps | None, features_wait_ms: float, finished_ms: float) -> None:
        """A finished request's stamps (ms since its Generate arrived)."""
        self.features_wait_seconds.observe(features_wait_ms / 1e3)
        self.request_seconds.observe(finished_ms / 1e3)
        if stamps is not None:
            self.first_token_seconds.observe(stamps.first_token_ms / 1e3)
            if stamps.prefill_start_ms is not None:
                self.queue_seconds.observe(max(0.0, stamps.prefill_start_ms - stamps.engine_added_ms) / 1e3)
