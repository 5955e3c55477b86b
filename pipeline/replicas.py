"""Vision and language replicas as the gateway sees them: servers given by address, on this node or
any other (the gateway starts none: `dvd serve` and `dvd launch` start them, deploy/); probed
(ProbeConfig), in or out of rotation by their answers, and picked by least outstanding work.

Membership is the list of addresses the gateway is given (flags, or the cluster config): a server
listed there but not running yet is "out" until it answers its first probe, then joins the
rotation by itself; one that stops answering leaves it and comes back the same way. The gateway
only dials addresses its operator named: no endpoint lets an unknown host join and receive prompts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from dvd.config_file import ConfigError
from dvd.errors import UnavailableError
from dvd.internal_auth import ClusterCredential
from dvd.v1 import common_pb2, language_pb2, language_pb2_grpc, vision_pb2_grpc

log = logging.getLogger(__name__)
STUBS = {"vision": vision_pb2_grpc.VisionStub, "language": language_pb2_grpc.LanguageStub}


@dataclass(frozen=True)
class ProbeConfig:
    """How the gateway decides a server is out of rotation. A probe is one Health + Stats round trip,
    answered on the server's event loop without touching its engine; a server is taken out only
    after `fail_threshold` probes in a row fail (no answer within `timeout_s`, or unreachable), so a
    server slow under load, answering one probe late, stays in. A server that says NOT_SERVING
    (draining) or whose process exited is out at once; any server comes back by itself on its next
    SERVING answer."""

    interval_s: float = 2.0
    timeout_s: float = 10.0
    fail_threshold: int = 3

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.timeout_s <= 0:
            raise ValueError(f"interval_s and timeout_s must be positive, got {self.interval_s}, {self.timeout_s}")
        if self.fail_threshold < 1:
            raise ValueError(f"fail_threshold must be at least 1, got {self.fail_threshold}")


# Channels to servers on other nodes: notice a dead peer (keepalive), and reconnect
# promptly once it is reachable again (gRPC's default backoff grows to 120 s). Each channel has connections of its
# own (a local subchannel pool): a replica that left rotation is dialled anew (`Replica._redial`), and gRPC's
# global pool would hand the new channel the old, possibly dead, connection again. The servers accept these pings
# (dvd/process.py: SERVER_KEEPALIVE). gRPC 1.85 waits a minute for a ping's ack (`grpc.http2.ping_timeout_ms`,
# left at its default here) whatever keepalive_timeout_ms says: the probes (ProbeConfig) take a silent server out
# of rotation first, failing its calls naming it, and a 5 s ping timeout would race them with a bare
# "ping timeout" error.
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 256 << 20), ("grpc.keepalive_time_ms", 10_000),
                   ("grpc.keepalive_timeout_ms", 5_000), ("grpc.keepalive_permit_without_calls", 0),
                   ("grpc.initial_reconnect_backoff_ms", 500), ("grpc.max_reconnect_backoff_ms", 2_000),
                   ("grpc.use_local_subchannel_pool", 1)]


# Request ids a language replica is owed an Abort for (it was lost while holding them): sent when it comes back.
# Bounded: a replica gone for good would otherwise collect every id sent to it; the oldest are forgotten first
# (the server frees those at their own deadline, or when its keepalive finds the old connection dead).
MAX_ABANDONED = 4096
ABORT_TIMEOUT_S = 5.0

_SAID_WHY = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)  # a deployment fault: say what


def _probe_failure(err: grpc.aio.AioRpcError | TimeoutError, timeout_s: float) -> str:
    if not isinstance(err, grpc.aio.AioRpcError):
        return f"no answer in {timeout_s:g}s"
    return f"{err.code().name}: {err.details()}" if err.code() in _SAID_WHY else err.code().name


@dataclass(eq=False)
class Work:
    """One call (or task) in flight on a replica; `lost` once the replica left rotation and cancelled it."""

    cancel: Callable[[], Any]
    task: asyncio.Task | None = None
    lost: bool = False


@dataclass(eq=False)
class Replica:
    kind: str  # "vision" or "language"
    address: str  # gRPC host:port
    pid: int | None = None  # the server's process, where the deployment that started it says (dvd serve)
    exit_code: int | None = None  # set by that deployment when the process exited: out for good
    transport_address: str = ""  # language replicas: where features are pushed
    metrics_url: str = ""  # the server's own Prometheus endpoint, as its Health says
    healthy: bool = False  # in rotation
    num_outstanding: int = 0
    counters: dict[str, float] = field(default_factory=dict)
    channel: grpc.aio.Channel | None = None
    stub: Any = None  # the kind's generated gRPC stub, once connected
    consecutive_failures: int = 0
    state: str = "not probed yet"  # why it is in or out of rotation, for /v1/instances and logs
    last_probe_ms: float = 0.0
    num_calls_failed: int = 0  # calls failed because this replica left rotation while serving them
    # the cluster's credential this gateway presents (dvd/internal_auth.py): mutual TLS, signed calls, or none
    credential: ClusterCredential = field(default_factory=ClusterCredential)
    # vision replicas: the language servers' transport addresses this server was told it may push to
    # (forgotten when it leaves rotation: it may come back as a new process that knows none)
    allowed_destinations: set[str] = field(default_factory=set)
    revision: str = ""  # the checkpoint commit the server reports in Health ("" where it has none)
    expected_revision: str = ""  # the gateway's own: a server on another is kept out of rotation
    # language replicas (P/D): both, prefill or decode, and the KV layout a prefill / decode pair must share, as
    # their Health says (language_server/kv_transfer.py); the router pairs only servers of one layout
    role: str = ""
    kv_layout: str = ""
    # language replicas: requests abandoned here while it was lost (no Abort reached it), oldest first
    abandoned: dict[str, None] = field(default_factory=dict)
    num_aborts_on_return: int = 0  # Aborts sent for them when it came back into rotation
    num_abandoned_forgotten: int = 0  # ids dropped past MAX_ABANDONED, never aborted
    _work: set[Work] = field(default_factory=set)

    def connect(self) -> None:
        self.channel = self.credential.channel(self.address, CHANNEL_OPTIONS)
        self.stub = STUBS[self.kind](self.channel)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()

    def exited(self, code: int | None) -> None:
        """The server's process exited (its deployment saw it): out of rotation now, not at the next probes,
        and the calls it held fail at once."""
        if self.healthy:
            log.error("%s server %s (pid %s) exited with code %s", self.kind, self.address, self.pid, code)
        self.exit_code = code
        self._out(f"process exited with code {code}")

    async def check(self, timeout_s: float = 5.0, fail_threshold: int = 1) -> bool:
        """One probe; updates whether the replica is in rotation (see ProbeConfig)."""
        if self.exit_code is not None:
            return False
        t0 = time.perf_counter()
        try:
            health, stats = await asyncio.wait_for(self._probe(), timeout_s)
        except (grpc.aio.AioRpcError, TimeoutError) as err:
            self._probe_failed(_probe_failure(err, timeout_s), fail_threshold)
            return self.healthy
        self.last_probe_ms = (time.perf_counter() - t0) * 1e3
        self.consecutive_failures = 0
        self.transport_address = health.transport_address or self.transport_address
        self.metrics_url = health.metrics_url
        self.counters = dict(stats.counters)
        self.revision = health.revision
        self.role, self.kv_layout = health.role, health.kv_layout
        if self._other_revision():
            return False
        if health.status != common_pb2.HealthResponse.SERVING:
            if self.healthy:
                log.warning("%s server %s says %s; out of rotation", self.kind, self.address, health.detail)
            self._out(f"not serving: {health.detail}", fail_inflight=False)  # draining finishes its work
            return False
        if not self.healthy:
            await self._abort_abandoned()
            log.info("%s server %s is serving; in rotation%s", self.kind, self.address,
                     f" (features at {self.transport_address})" if self.transport_address else "")
        self.healthy, self.state = True, "serving"
        return True

    def _probe_failed(self, cause: str, fail_threshold: int) -> None:
        self.consecutive_failures += 1
        if self.consecutive_failures < fail_threshold:
            if self.healthy:
                log.info("%s server %s: health probe failed (%s), %d of %d before it leaves rotation",
                         self.kind, self.address, cause, self.consecutive_failures, fail_threshold)
            return
        was_healthy = self.healthy
        if was_healthy:
            log.warning("%s server %s: %d health probes in a row failed (last: %s); out of rotation",
                        self.kind, self.address, self.consecutive_failures, cause)
        self._out(f"{self.consecutive_failures} health probes in a row failed (last: {cause})")
        if was_healthy:
            self._redial()  # after _out: the calls it held end as lost, not as the closed channel's errors

    def abandon(self, request_id: str) -> None:
        """A request this replica may still hold but was sent no Abort (it was lost, or the Abort went unanswered):
        the Abort goes when it is back in rotation (`_abort_abandoned`)."""
        self.abandoned[request_id] = None
        while len(self.abandoned) > MAX_ABANDONED:
            del self.abandoned[next(iter(self.abandoned))]
            self.num_abandoned_forgotten += 1

    async def _abort_abandoned(self) -> None:
        """Back from lost: a server that was frozen or cut off (not dead) may still run the requests abandoned on
        it, decoding for nobody and holding their KV blocks and features; each gets its Abort now, before the
        replica takes new work. One that goes unanswered is kept for the next return."""
        ids, self.abandoned = list(self.abandoned), {}
        if not ids:
            return
        stub: Any = self.stub
        results = await asyncio.gather(
            *(stub.Abort(language_pb2.AbortRequest(request_id=rid), timeout=ABORT_TIMEOUT_S) for rid in ids),
            return_exceptions=True)
        found = sum(getattr(r, "found", False) for r in results)
        for rid, result in zip(ids, results, strict=True):
            if isinstance(result, BaseException):
                self.abandon(rid)
        self.num_aborts_on_return += len(ids)
        log.warning("%s server %s is back: aborted %d requests abandoned there while it was lost (%d still held "
                    "by it)", self.kind, self.address, len(ids), found)

    def _redial(self) -> None:
        """Left rotation because its probes failed: a new connection from now on. The old one may be dead with no
        sign of it (a peer cut off sends no FIN), and the channel would keep it until its keepalive gives up;
        a new connection reaches the server as soon as it is reachable again."""
        old = self.channel
        if old is None:
            return
        self.connect()
        closing = asyncio.ensure_future(old.close())
        closing.add_done_callback(lambda task: task.cancelled() or task.exception())

    def _other_revision(self) -> bool:
        """A server on another checkpoint revision than this gateway's (both known) stays out, naming both:
        every node must serve the same weights."""
        if not (self.revision and self.expected_revision) or self.revision == self.expected_revision:
            return False
        reason = f"serves checkpoint revision {self.revision}, this gateway revision {self.expected_revision}"
        if self.state != reason:
            log.error("%s server %s %s: kept out of rotation", self.kind, self.address, reason)
        self._out(reason)
        return True

    async def _probe(self) -> tuple[Any, Any]:
        health = await self.stub.Health(common_pb2.HealthRequest())
        stats = await self.stub.Stats(common_pb2.StatsRequest())
        return health, stats

    async def refresh_counters(self, timeout_s: float) -> None:
        """The server's counters as of now (a Stats call), for a scrape of the gateway's /metrics; a server
        that does not answer in `timeout_s` keeps its last probe's (its health is the probes' business)."""
        if not self.healthy or self.stub is None:
            return
        with contextlib.suppress(grpc.aio.AioRpcError, TimeoutError):
            stats = await asyncio.wait_for(self.stub.Stats(common_pb2.StatsRequest()), timeout_s)
            self.counters = dict(stats.counters)

    def _out(self, reason: str, fail_inflight: bool = True) -> None:
        """Out of rotation; requests it is serving fail now, naming why, instead of at their deadline
        (a hung server would hold them that long)."""
        self.healthy, self.state = False, reason
        self.allowed_destinations.clear()
        if fail_inflight:
            for work in self._work:
                if not work.lost:
                    work.lost = True
                    work.cancel()

    @contextlib.asynccontextmanager
    async def in_use(self, call: Any = None) -> AsyncIterator[Work]:
        """Counts work on this replica while inside: a gRPC `call` (unary or streaming), or else the
        current task. If the replica leaves rotation meanwhile, that call (or task) is cancelled and the
        work ends with UnavailableError naming the replica and why; `Work.lost` tells the caller not to
        send the server anything more (an Abort to a hung server would hang too)."""
        task = None if call is not None else asyncio.current_task()
        work = Work(call.cancel if call is not None else task.cancel, task)  # type: ignore[union-attr]
        self._work.add(work)
        self.num_outstanding += 1
        try:
            yield work
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            if not work.lost:
                raise  # the request itself was cancelled, or the server answered with an error
            if task is not None:
                task.uncancel()
            self.num_calls_failed += 1
            raise UnavailableError(f"{self.kind} server {self.address} was taken out of rotation (it stopped "
                                   f"answering) while serving this request: {self.state}") from None
        finally:
            self._work.discard(work)
            self.num_outstanding -= 1

    def describe(self) -> dict[str, Any]:
        """One roster entry of GET /v1/instances."""
        out: dict[str, Any] = {"kind": self.kind, "address": self.address, "healthy": self.healthy,
                               "state": self.state, "consecutive_failures": self.consecutive_failures,
                               "load": self.num_outstanding, "last_probe_ms": round(self.last_probe_ms, 2),
                               "counters": self.counters}
        if self.kind == "language":
            out["transport_address"] = self.transport_address
            out["role"] = self.role or "both"
        if self.metrics_url:
            out["metrics_url"] = self.metrics_url
        if self.revision:
            out["revision"] = self.revision
        if self.pid is not None:
            out["pid"] = self.pid
        return out


class ReplicaPool:
    """Replicas of one kind. `pick` takes the healthy one with the least outstanding work."""

    def __init__(self, kind: str, replicas: Sequence[Replica], credential: ClusterCredential | None = None,
                 revision: str = "") -> None:
        self.kind = kind
        self.replicas = list(replicas)
        # how servers that join later are dialled, and the checkpoint revision they must serve
        self.credential = credential or ClusterCredential()
        self.revision = revision

    def pick(self, exclude: Sequence[Replica] = ()) -> Replica:
        candidates = [r for r in self.replicas if r.healthy and r not in exclude]
        if not candidates:
            raise UnavailableError(f"no healthy {self.kind} replica ({len(self.replicas)} configured)")
        return min(candidates, key=lambda r: r.num_outstanding)

    def by_address(self, address: str) -> Replica:
        for replica in self.replicas:
            if replica.address == address:
                return replica
        raise KeyError(f"no {self.kind} replica at {address}")

    async def check_all(self, probe: ProbeConfig | None = None) -> None:
        probe = probe or ProbeConfig()
        await asyncio.gather(*(r.check(probe.timeout_s, probe.fail_threshold) for r in self.replicas))


def attached(kind: str, addresses: Sequence[str], credential: ClusterCredential | None = None,
             revision: str = "") -> ReplicaPool:
    """A pool of servers by their gRPC addresses, dialled presenting `credential`; a server that serves another
    checkpoint revision than `revision` (where both are known) is kept out of rotation."""
    credential = credential or ClusterCredential()
    return ReplicaPool(kind, [Replica(kind=kind, address=a, credential=credential, expected_revision=revision)
                              for a in addresses], credential, revision)


# --- roster changes: servers a deployment adds or takes away while the gateway runs (dvd cluster's autoscaler)
def check_address(address: str, where: str) -> None:
    """A server's gRPC address as a roster lists it: HOST:PORT; ConfigError naming `where` otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where}: {address!r} is not HOST:PORT")


def join(pool: ReplicaPool, address: str) -> Replica:
    """A server that joins the pool: connected now, in rotation once it answers a probe."""
    replica = Replica(kind=pool.kind, address=address, credential=pool.credential,
                      expected_revision=pool.revision)
    replica.connect()
    pool.replicas.append(replica)
    return replica


def leave(pool: ReplicaPool, address: str) -> Replica:
    """A server that leaves the pool: no new work from now on (no pick, no probe sees it); the calls it holds
    go on (`drained` waits for them), since a server that leaves a roster is drained, not failed."""
    replica = pool.by_address(address)
    pool.replicas.remove(replica)
    replica.state = "leaving the roster"
    return replica


async def drained(replicas: Sequence[Replica], timeout_s: float, poll_s: float = 0.1) -> bool:
    """Whether every one of `replicas` finished the calls it held within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while any(r.num_outstanding for r in replicas):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(poll_s)  # the calls end on their own schedule; nothing to wait on but their count
    return True
