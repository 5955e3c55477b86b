"""The three-stage pipeline: Encode goes to a vision replica and Generate to a language replica at
the same moment; the vision server pushes each image's features to the language server's transport
address as soon as they exist, and the language server starts the request when they are complete.
Requests overlap freely: one request's encode runs while others transfer and decode.

Which replicas serve a request, and its retries, are the router's (`pipeline/router.py`); the
request's calls, from dispatch to its last event, its flow's (`pipeline/request_flow.py`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any

from dvd.checkpoint import open_checkpoint
from dvd.errors import CheckpointError
from dvd.pipeline.backends.base import Backend
from dvd.pipeline.replicas import ProbeConfig, Replica, ReplicaPool, drained, join, leave
from dvd.pipeline.request_flow import RequestFlow
from dvd.pipeline.router import Router, can_serve
from dvd.requests import GenerationEvent, TokenizedRequest

log = logging.getLogger(__name__)
# A scrape of the gateway's /metrics asks every server for its counters; one that does not answer this soon
# keeps its last probe's, so a hung server never holds up a scrape (Prometheus waits 10 s by default).
SCRAPE_STATS_TIMEOUT_S = 2.0


def splits_images(model: Path) -> bool:
    """Whether a request's images may be encoded on several vision replicas, each where its features are
    cached (pipeline/affinity.py): not for a Flash checkpoint, whose ViR decides routes over a whole request."""
    try:
        return open_checkpoint(model).flash is None
    except CheckpointError:
        return True  # not readable here: the serving core, which reads the same checkpoint, reports why


class DisaggregatedBackend(Backend):
    def __init__(self, model: str | Path, vision: ReplicaPool, language: ReplicaPool,
                 probe: ProbeConfig | None = None, model_name: str | None = None) -> None:
        """Vision and language servers by address, started by someone else (deploy/) or not yet: each
        joins and leaves the rotation as its probes say. `model`: its tokenizer and chat template;
        `model_name`: what clients call it (default: the directory's name)."""
        self.model_path = Path(model)
        self.model_name = model_name or self.model_path.name
        self.vision, self.language = vision, language
        self.probe = probe or ProbeConfig()  # a busy server is not a failed one: 3 misses in a row
        self.router = Router(vision, language, split_images=splits_images(self.model_path))
        self._health_task: asyncio.Task | None = None
        self.mode = f"disaggregated ({len(vision.replicas)} vision, {len(language.replicas)} language)"

    @property
    def replicas(self) -> list[Replica]:
        return self.vision.replicas + self.language.replicas

    async def start(self) -> None:
        """Connect and probe every server once: serve with whichever answer, the rest join when they do."""
        for replica in self.replicas:
            replica.connect()
        await asyncio.gather(self.vision.check_all(self.probe), self.language.check_all(self.probe))
        self._health_task = asyncio.create_task(self._health_loop())

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.probe.interval_s)
            # a server leaving rotation here fails the calls it holds at once (Replica.in_use)
            await asyncio.gather(self.vision.check_all(self.probe), self.language.check_all(self.probe))

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        await asyncio.gather(*(replica.close() for replica in self.replicas))

    async def health(self) -> tuple[bool, str]:
        num_vision = sum(r.healthy for r in self.vision.replicas)
        num_language = sum(r.healthy for r in self.language.replicas)
        detail = (f"{num_vision}/{len(self.vision.replicas)} vision, "
                  f"{num_language}/{len(self.language.replicas)} language replicas healthy")
        routable = can_serve(self.language)  # P/D: a prefill and a decode server of one layout, not half a pair
        if num_language and not routable:
            detail += " (no prefill and decode server of one KV layout among them)"
        return num_vision > 0 and routable, detail

    def instances(self) -> list[dict[str, Any]]:
        """The roster: every vision and language server with its health, load and address."""
        return [r.describe() for pool in (self.vision, self.language) for r in pool.replicas]

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_encode_retries": self.router.num_encode_retries,
                               "num_encode_splits": self.router.num_encode_splits,
                               "num_busy_retries": self.router.num_busy_retries,
                               "num_lost_retries": self.router.num_lost_retries,
                               "num_decode_redirects": self.router.num_decode_redirects,
                               "num_calls_failed_on_lost_replica": sum(
                                   r.num_calls_failed for pool in (self.vision, self.language) for r in pool.replicas),
                               # requests abandoned on a lost language server: aborted when it came back, still
                               # owed an Abort, or forgotten past the bound (Replica.abandon)
                               "num_aborts_on_return": sum(r.num_aborts_on_return for r in self.language.replicas),
                               "num_aborts_owed": sum(len(r.abandoned) for r in self.language.replicas),
                               "num_abandoned_forgotten": sum(r.num_abandoned_forgotten
                                                              for r in self.language.replicas)}
        for pool in (self.vision, self.language):
            out[f"{pool.kind}_outstanding"] = sum(r.num_outstanding for r in pool.replicas)
            out[f"{pool.kind}_healthy_replicas"] = sum(r.healthy for r in pool.replicas)
            for i, replica in enumerate(pool.replicas):
                for name, value in replica.counters.items():
                    out[f"{pool.kind}{i}_{name}"] = value
        return out

    async def refresh_stats(self) -> None:
        """Every healthy server's counters as of now, so /metrics is current at scrape time and not one probe
        interval old; within the probe timeout (a server that does not answer keeps its probe's counters)."""
        timeout_s = min(self.probe.timeout_s, SCRAPE_STATS_TIMEOUT_S)
        await asyncio.gather(*(r.refresh_counters(timeout_s) for r in self.replicas))

    async def set_roster(self, vision: Sequence[str], language: Sequence[str],
                         drain_timeout_s: float) -> dict[str, Any]:
        """The servers to route to from now on (a deployment that adds or removes replicas says so, through
        pipeline/roster_admin.py): new ones join and are probed once (in rotation if they answer, else when
        their probes do); ones no longer listed take no new work and are closed once the calls they hold
        finished, within `drain_timeout_s` (the answer says whether they did). Nothing a client sent fails."""
        if not language:
            raise ValueError("language: at least one language server address is needed")
        added: list[Replica] = []
        leaving: list[Replica] = []
        for pool, addresses in ((self.vision, vision), (self.language, language)):
            current = {r.address for r in pool.replicas}
            added += [join(pool, a) for a in addresses if a not in current]
            leaving += [leave(pool, a) for a in current - set(addresses)]
        await asyncio.gather(*(r.check(self.probe.timeout_s, self.probe.fail_threshold) for r in added))
        done = await drained(leaving, drain_timeout_s)
        await asyncio.gather(*(r.close() for r in leaving))
        for replica in added + leaving:
            log.warning("roster: %s server %s %s", replica.kind, replica.address,
                        "joined" if replica in added else "left" + ("" if done else " (calls still running)"))
        self.mode = f"disaggregated ({len(self.vision.replicas)} vision, {len(self.language.replicas)} language)"
        return {"added": [r.address for r in added], "removed": [r.address for r in leaving], "drained": done}

    def generate(self, request: TokenizedRequest) -> AsyncGenerator[GenerationEvent, None]:
        return self.router.generate(request.request_id, bool(request.media),
                                    lambda language, decode: RequestFlow(request, language, self.router,
                                                                         decode).run())
