"""The simulator's P/D replicas (`dvd-pd` modes): a prefill replica is an `EngineReplica` whose requests leave at
their first token, each chunk's KV pushed over its KV link (one chunk at a time) when the chunk's step ends, so only
the last chunk's transfer follows the prefill; a decode replica is one whose requests `join` already prefilled, when
their last chunk's KV has landed, and go straight into its decode batch. The engine replica and the events are in
`sim_stages.py`."""

from __future__ import annotations

from dvd.deploy.cost_profile import CostProfile
from dvd.deploy.sim_stages import Driver, EngineReplica, SimRequest, SimSettings


class PrefillReplica(EngineReplica):
    __slots__ = ("kv_bytes_per_token", "kv_link_free")

    def __init__(self, driver: Driver, profile: CostProfile, settings: SimSettings, kv_bytes_per_token: int) -> None:
        super().__init__(driver, profile, settings)
        self.kv_bytes_per_token = kv_bytes_per_token
        self.kv_link_free = 0.0  # when its KV link to the decode replicas is free

    def _reserve(self, request: SimRequest) -> int:
        """It keeps only the prompt's KV: the output is decoded elsewhere."""
        return request.prompt_len

    def _end_step(self, now: float, chunks: list[tuple[SimRequest, int]]) -> None:
        # Pushed before the step's first tokens are handed off, so a hand-off waits for its last chunk's KV.
        for request, n in chunks:
            self._push_kv(now, request, n)
        super()._end_step(now, chunks)

    def _push_kv(self, now: float, request: SimRequest, tokens: int) -> None:
        """A chunk's KV blocks leave for the decode replica over this replica's KV link."""
        assert self.transport is not None
        start = self.kv_link_free if self.kv_link_free > now else now
        request.kv_landed = self.kv_link_free = start + self.transport(tokens * self.kv_bytes_per_token)

    def _first_token(self, now: float, request: SimRequest) -> None:
        """The request leaves here; its decode replica takes it when its last KV has landed."""
        self.driver.first_token(now, request)
        self.num_running -= 1
        self.kv_used -= self._reserve(request)
        self.driver.prefilled(now, request)
        if request.output == 1:
            self.driver.finished(now, request)
        else:
            self.at(request.kv_landed, request.decode.join, request)


class DecodeReplica(EngineReplica):
    __slots__ = ()

    def join(self, now: float, request: SimRequest) -> None:
        """`request`, prefilled elsewhere, its KV landed here; it decodes once admitted."""
        self.waiting.append(request)
        self._poke(now)

    def _admitted(self, request: SimRequest) -> None:
        self._start_decoding(request)
