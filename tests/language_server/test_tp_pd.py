"""P/D with tensor parallel on a CPU: `dvd language --tp 2 --role prefill` and `--tp 2 --role decode`, each two
processes (gloo). Shard to shard (kv_shards.py): each prefill rank pushes its own KV heads to its own decode rank,
whose receivers the decode group's rank 0 names at connect; the servers' Stats say which path each export and
import took. The split's tokens equal transformers' monolithic output (greedy; text and one image) and a seeded
sampled request continues the stream one process draws, over tcp and over rdma (its handshake names the decode
ranks as tcp's does), each path counted on /metrics as in Stats; a tp=1 decode server refuses the tp=2 prefill server at
connect, naming tp, and the KV the prefill group held is pushed again (PushKv), shard to shard, to the tp=2 decode
server; a rank's shard that never comes fails the request by name on every rank; whole blocks (the through-rank-0
fallback) are still scattered; nothing stays allocated; SIGTERM stops every rank."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from dvd.language_server.kv_transfer import KvPusher
from dvd.language_server.model import LanguageHalf
from dvd.language_server.request import Handoff, KvExport
from dvd.language_server.server_config import LanguageServerConfig
from dvd.language_server.tp_serve import inbox_transport
from dvd.prompt import ChatFormat
from dvd.sampling import SamplingParams
from dvd.transport import TransportConfig, create_sender
from dvd.v1 import common_pb2, language_pb2, language_pb2_grpc
from tests.language_server.conftest import make_engine
from tests.language_server.pd_harness import kv_stats_on_metrics
from tests.language_server.test_engine import run
from tests.language_server.test_language_server import collect, expected, generate_request
from tests.language_server.test_tp_cli import READY, _push
from tests.serve_process import read_line

PROMPT = [5, 6, 7, 300, 301, 302, 500, 42, 17, 99]
Responses = Iterator[language_pb2.LanguageGenerateResponse]


@dataclass
class Started:
    """One `dvd language` process (rank 0; its followers are its children) and a channel to it."""

    proc: subprocess.Popen[str]
    channel: grpc.Channel | None = None
    transport_address: str = ""

    @property
    def stub(self) -> language_pb2_grpc.LanguageStub:
        return language_pb2_grpc.LanguageStub(self.channel)

    def stats(self) -> dict[str, float]:
        return dict(self.stub.Stats(common_pb2.StatsRequest()).counters)

    def ready(self) -> None:
        line = read_line(self.proc, 300)
        assert line.startswith(READY), (line, self.proc.poll(),
                                        self.proc.stderr.read() if self.proc.poll() is not None and self.proc.stderr
                                        else "")
        address, self.transport_address = line[len(READY):].strip().split(" features on ")
        self.channel = grpc.insecure_channel(address)

    def stop(self) -> None:
        """SIGTERM: rank 0 drains, stops its followers and exits 0."""
        if self.channel is not None:
            self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(120) == 0, self.proc.stderr.read() if self.proc.stderr else ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


SHARD_TIMEOUT_S = 2  # how long a decode rank waits for its own KV heads: the missing-shard case waits this long


def _start(model: Path, role: str, tp: int, transport: str = "tcp") -> Started:
    cmd = [sys.executable, "-m", "dvd", "language", "--model", str(model), "--port", "0", "--transport", transport,
           "--num-blocks", "256", "--block-size", "16", "--max-batch-tokens", "64", "--role", role,
           "--kv-shard-timeout-s", str(SHARD_TIMEOUT_S), "--log-level", "WARNING"]
    cmd += ["--tp", str(tp)] if tp > 1 else []
    env = os.environ | {"UCX_TLS": "tcp"}  # rdma over UCX's tcp on loopback, as the transport tests run it
    return Started(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))


def _started(started: dict[str, Started]) -> Iterator[dict[str, Started]]:
    """Servers started, ready, then stopped (SIGTERM: each exits 0) or, failing that, killed."""
    try:
        for server in started.values():
            server.ready()
        yield started
        for server in started.values():
            server.stop()
    finally:
        for server in started.values():
            server.kill()


@pytest.fixture(scope="module")
def servers(tiny_hf: Path) -> Iterator[dict[str, Started]]:
    yield from _started({"prefill": _start(tiny_hf, "prefill", 2), "decode": _start(tiny_hf, "decode", 2),
                         "decode_tp1": _start(tiny_hf, "decode", 1)})


@pytest.fixture(scope="module")
def rdma_servers(tiny_hf: Path) -> Iterator[dict[str, Started]]:
    """A tp=2 prefill and a tp=2 decode server over rdma."""
    pytest.importorskip("ucxx", reason="ucxx not importable: install the rdma extra")
    yield from _started({role: _start(tiny_hf, role, 2, "rdma") for role in ("prefill", "decode")})


def split(servers: dict[str, Started], request: language_pb2.LanguageGenerateRequest, decode: str = "decode",
          features: list[torch.Tensor] = ()) -> tuple[Responses, Responses]:  # type: ignore[assignment]
    """Generate on the prefill server naming the decode server, and on the decode server, as the gateway does;
    the image features pushed to the prefill server as a vision server does."""
    to_prefill, to_decode = language_pb2.LanguageGenerateRequest(), language_pb2.LanguageGenerateRequest()
    to_prefill.CopyFrom(request)
    to_prefill.kv_destination = servers[decode].transport_address
    to_decode.CopyFrom(request)
    to_decode.kv_source = True
    streams = servers["prefill"].stub.Generate(to_prefill), servers[decode].stub.Generate(to_decode)
    if features:
        _push(servers["prefill"].transport_address, request.request_id, dict(enumerate(features)))
    return streams


def release(servers: dict[str, Started], request_id: str) -> bool:
    """What the gateway sends the prefill server at the decode server's first message: free the KV it held."""
    return servers["prefill"].stub.ReleaseKv(language_pb2.ReleaseKvRequest(request_id=request_id)).found


def collect_releasing(servers: dict[str, Started], stream: Responses, request_id: str) -> tuple[list[int], str]:
    """The decode server's stream, the prefill server's held KV released at its first message."""
    messages = iter(stream)
    first = next(messages)
    release(servers, request_id)
    tokens, reason = collect(messages)
    return [*first.token_ids, *tokens], first.finish_reason or reason


def generate_split(servers: dict[str, Started], request: language_pb2.LanguageGenerateRequest,
                   features: list[torch.Tensor] = ()) -> tuple[list[int], str]:  # type: ignore[assignment]
    prefill, decode = split(servers, request, features=features)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(collect, prefill)
        rest = pool.submit(collect_releasing, servers, decode, request.request_id)
        (tokens, reason), (more, final) = first.result(180), rest.result(180)
    assert len(tokens) == 1 and reason == "", (tokens, reason)  # handed off after the first token
    return tokens + more, final


def assert_freed(server: Started) -> None:
    """Every request's KV blocks and intake entries gone (the engine publishes its stats after each step: polled,
    bounded)."""
    deadline = time.monotonic() + 60
    while True:
        stats = server.stats()
        if stats["num_kv_blocks_used"] == 0 and stats["num_kv_requests_arriving"] == 0 and \
                stats["num_streams"] == 0 and stats["num_kv_incoming"] == 0 and stats["num_kv_held_requests"] == 0:
            return
        assert time.monotonic() < deadline, stats
        threading.Event().wait(0.05)


PATHS = ("num_kv_exports_shard_to_shard", "num_kv_exports_through_rank0", "num_kv_imports_shard_to_shard",
         "num_kv_imports_through_rank0")


def paths(servers: dict[str, Started]) -> dict[str, float]:
    """How many exports (the prefill group) and imports (the tp=2 decode group) took each path so far."""
    return {name: servers[role].stats()[name] for name, role in zip(PATHS, ("prefill", "prefill", "decode", "decode"),
                                                                     strict=True)}


def assert_shard_to_shard(servers: dict[str, Started], before: dict[str, float]) -> None:
    """Since `before`, KV moved shard to shard on both sides and none through rank 0."""
    now = paths(servers)
    assert now["num_kv_exports_shard_to_shard"] > before["num_kv_exports_shard_to_shard"], (before, now)
    assert now["num_kv_imports_shard_to_shard"] > before["num_kv_imports_shard_to_shard"], (before, now)
    assert now["num_kv_exports_through_rank0"] == before["num_kv_exports_through_rank0"], (before, now)
    assert now["num_kv_imports_through_rank0"] == before["num_kv_imports_through_rank0"], (before, now)


def assert_paths_on_metrics(servers: dict[str, Started]) -> None:
    """The quiet servers' P/D counters on their /metrics as Stats has them, KV moved shard to shard there too."""
    prefill, decode = (kv_stats_on_metrics(servers[role].stub) for role in ("prefill", "decode"))
    assert prefill["num_kv_exports_shard_to_shard"] > 0 and decode["num_kv_imports_shard_to_shard"] > 0


def test_tp2_split_greedy_equals_monolithic(servers: dict[str, Started], chat: ChatFormat, language: LanguageHalf,
                                            image_features: list[torch.Tensor]) -> None:
    before = paths(servers)
    cases = {"text": (generate_request(chat, "tp-text", "write a poem about the sea"), []),
             "one": (generate_request(chat, "tp-one", "<image>\ndescribe", num_images=1), image_features[:1])}
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:  # concurrent, as the batch runs them
        futures = {name: pool.submit(generate_split, servers, request, features)
                   for name, (request, features) in cases.items()}
        results = {name: f.result(300) for name, f in futures.items()}
    for name, (request, features) in cases.items():
        assert results[name] == (expected(language, chat, request, list(features)), "length"), name
    # several chunks' blocks left as they completed (max_batch_tokens 64), each rank's heads to its own decode rank
    assert servers["prefill"].stats()["num_kv_blocks_exported"] >= 256 // 16
    assert servers["decode"].stats()["num_kv_blocks_imported"] == servers["prefill"].stats()["num_kv_blocks_exported"]
    assert_shard_to_shard(servers, before)
    for server in servers.values():
        assert_freed(server)
    assert_paths_on_metrics(servers)


def test_tp2_seeded_sampled_request_continues_its_stream(servers: dict[str, Started],
                                                         language: LanguageHalf) -> None:
    sampling = {"temperature": 1.0, "seed": 1234, "top_p": 0.95, "repetition_penalty": 1.2, "max_new_tokens": 12,
                "min_new_tokens": 12}
    before = paths(servers)
    request = language_pb2.LanguageGenerateRequest(request_id="tp-seeded",
                                                   segments=[language_pb2.TokenSegment(ids=PROMPT)],
                                                   sampling=language_pb2.LanguageSampling(**sampling))
    tokens, reason = generate_split(servers, request)
    one_process = run(make_engine(language), [(PROMPT, [])], SamplingParams(**sampling))[0]
    assert (tokens, reason) == (one_process, "length")
    assert_shard_to_shard(servers, before)
    other = run(make_engine(language), [(PROMPT, [])], SamplingParams(**(sampling | {"seed": 99})))[0]
    assert other != one_process  # the seed matters: the equality above is the stream continuing, not chance
    for server in servers.values():
        assert_freed(server)


def test_tp2_over_rdma_goes_shard_to_shard(rdma_servers: dict[str, Started], chat: ChatFormat,
                                          language: LanguageHalf, image_features: list[torch.Tensor]) -> None:
    """rdma's handshake names the decode ranks' receivers as tcp's does: each prefill rank pushes its own heads to its
    own decode rank over rdma, none through rank 0; greedy tokens (text and one image, its features over rdma too) are
    transformers' own, and a seeded sampled request continues the stream one process draws."""
    servers = rdma_servers
    assert servers["decode"].transport_address.startswith("rdma://")
    before = paths(servers)
    for request, features in ((generate_request(chat, "rdma-text", "write a poem about the sea"), []),
                              (generate_request(chat, "rdma-one", "<image>\ndescribe", num_images=1),
                               image_features[:1])):
        assert generate_split(servers, request, features) == (expected(language, chat, request, list(features)),
                                                              "length"), request.request_id
    sampling = {"temperature": 1.0, "seed": 1234, "top_p": 0.95, "max_new_tokens": 8, "min_new_tokens": 8}
    request = language_pb2.LanguageGenerateRequest(request_id="rdma-seeded",
                                                   segments=[language_pb2.TokenSegment(ids=PROMPT)],
                                                   sampling=language_pb2.LanguageSampling(**sampling))
    one_process = run(make_engine(language), [(PROMPT, [])], SamplingParams(**sampling))[0]
    assert generate_split(servers, request) == (one_process, "length")
    assert_shard_to_shard(servers, before)
    for server in servers.values():
        assert_freed(server)
    assert_paths_on_metrics(servers)


def test_a_decode_ranks_inbox_receives_on_its_own_device(tiny_hf: Path) -> None:
    """Over rdma UCX writes a decode rank's KV heads straight into device memory: rank 1's, not rank 0's (where its
    engine would have to copy them across); tcp lands them in host memory on every rank. Each on a port of its own."""
    for kind, device, want in (("rdma", "cuda:0", "cuda:1"), ("rdma", "cuda", "cuda:1"), ("rdma", "cuda:2", "cuda:3"),
                               ("rdma", "cpu", "cpu"), ("tcp", "cuda:0", "cpu")):
        config = LanguageServerConfig(model=tiny_hf, device=device, role="decode", tensor_parallel=2,
                                      transport=TransportConfig(kind=kind, port=7300))
        inbox = inbox_transport(config, 1)
        assert (inbox.kind, inbox.device, inbox.port) == (kind, want, 0), (kind, device)


def test_tp1_decode_refuses_tp2_prefill_naming_tp(servers: dict[str, Started], chat: ChatFormat) -> None:
    request = generate_request(chat, "tp-misfit", "hello there")
    prefill, decode = split(servers, request, decode="decode_tp1")
    with pytest.raises(grpc.RpcError) as caught:
        collect(prefill)
    assert "tp: 1 here vs 2 there" in (caught.value.details() or "")
    decode.cancel()  # as the gateway does: end the call (an Abort alone can come before the Generate), then Abort
    for name in ("prefill", "decode_tp1"):  # (the prefill server holds the hand-off)
        servers[name].stub.Abort(language_pb2.AbortRequest(request_id=request.request_id))
    with pytest.raises(grpc.RpcError):
        collect(decode)
    for server in servers.values():
        assert_freed(server)


def test_tp2_held_kv_pushed_again_to_another_decode_server(servers: dict[str, Started], chat: ChatFormat,
                                                           language: LanguageHalf) -> None:
    """The prefill group's hand-off to a decode server that refuses it (tp=1) fails after its first token, and the
    group holds the KV; PushKv sends it again, each rank its own heads to its own decode rank, to the tp=2 decode
    server, which continues the request to transformers' monolithic tokens."""
    request = generate_request(chat, "tp-repush", "hello there")
    to_prefill, to_decode = language_pb2.LanguageGenerateRequest(), language_pb2.LanguageGenerateRequest()
    to_prefill.CopyFrom(request)
    to_prefill.kv_destination = servers["decode_tp1"].transport_address
    to_decode.CopyFrom(request)
    to_decode.kv_source = True
    prefill = iter(servers["prefill"].stub.Generate(to_prefill))
    first = list(next(prefill).token_ids)  # the first token, then the push of the hand-off is refused
    with pytest.raises(grpc.RpcError):
        next(prefill)
    assert servers["prefill"].stats()["num_kv_held_requests"] == 1
    decode = servers["decode"].stub.Generate(to_decode)
    before = paths(servers)
    pushed = servers["prefill"].stub.PushKv(language_pb2.PushKvRequest(
        request_id=request.request_id, destination=servers["decode"].transport_address))
    assert pushed.num_blocks >= 1
    tokens, reason = collect_releasing(servers, decode, request.request_id)
    assert (first + tokens, reason) == (expected(language, chat, request, []), "length")
    assert_shard_to_shard(servers, before)
    for server in servers.values():
        assert_freed(server)


def _zero_blocks(servers: dict[str, Started], heads_per_rank: int) -> tuple[str, torch.Tensor]:
    """The decode group's layout (Health) and one block of zeros shaped by it, `heads_per_rank` x its heads."""
    layout = servers["decode"].stub.Health(common_pb2.HealthRequest()).kv_layout
    keys = dict(part.split("=", 1) for part in layout.split(";"))
    return layout, torch.zeros(int(keys["layers"]), 2, int(keys["block_size"]), heads_per_rank * int(keys["kv_heads"]),
                               int(keys["head_dim"]), dtype=getattr(torch, keys["dtype"]))


def _from_test(request_id: str) -> language_pb2.LanguageGenerateRequest:
    """A decode server's Generate whose KV the test itself pushes, standing in for a prefill group."""
    return language_pb2.LanguageGenerateRequest(
        request_id=request_id, segments=[language_pb2.TokenSegment(ids=PROMPT)], kv_source=True,
        sampling=language_pb2.LanguageSampling(max_new_tokens=4, min_new_tokens=4))


def test_tp2_missing_shard_fails_the_request_by_name_on_every_rank(servers: dict[str, Started], chat: ChatFormat,
                                                                   language: LanguageHalf) -> None:
    """A prefill group whose rank 1 never pushes (here the test stands in for it: rank 0's heads and the hand-off
    alone, to the decode group's rank 0): the decode group's rank 1 waits its bounded time for its heads, and the
    request fails naming rank 1, its blocks freed on every rank: the ranks stay in step, so the next request's tokens
    are still transformers' own."""
    decode = servers["decode"]
    layout, blocks = _zero_blocks(servers, 1)
    stream = decode.stub.Generate(_from_test("tp-half"))
    asyncio.run(_push_to_rank0(decode.transport_address, layout, "tp-half", blocks))
    with pytest.raises(grpc.RpcError) as caught:
        collect(stream)
    assert "tensor-parallel rank 1 did not get its KV heads" in (caught.value.details() or ""), caught.value
    assert_freed(decode)
    after = generate_request(chat, "tp-after-half", "hello there")
    assert generate_split(servers, after) == (expected(language, chat, after, []), "length")


def test_tp2_decode_group_still_takes_whole_blocks_through_rank0(servers: dict[str, Started]) -> None:
    """The fallback, for a prefill group that cannot reach the decode ranks (its KV gathered to rank 0): whole blocks,
    every rank's heads, pushed to the decode group's rank 0 alone are scattered to its ranks and the request decodes
    (the KV is zeros: its tokens are not checked), counted through rank 0."""
    decode = servers["decode"]
    layout, blocks = _zero_blocks(servers, 2)
    before = paths(servers)
    stream = decode.stub.Generate(_from_test("tp-whole"))
    asyncio.run(_push_to_rank0(decode.transport_address, layout, "tp-whole", blocks))
    tokens, reason = collect(stream)
    assert len(tokens) == 3 and reason == "length"  # the first of the 4 came with the hand-off
    now = paths(servers)
    assert now["num_kv_imports_through_rank0"] == before["num_kv_imports_through_rank0"] + 1
    assert now["num_kv_imports_shard_to_shard"] == before["num_kv_imports_shard_to_shard"]
    assert_freed(decode)


async def _push_to_rank0(destination: str, layout: str, request_id: str, blocks: torch.Tensor) -> None:
    sender = create_sender(TransportConfig(kind="tcp"))
    sender.kv_layout = layout
    try:
        await KvPusher(sender, layout).push(destination, request_id,
                                            KvExport(0, 1, blocks, Handoff(tuple(PROMPT), 7, b"", 0)))
    finally:
        await sender.close()
