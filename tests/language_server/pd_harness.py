"""P/D in one test process: a prefill and a decode language server (and a role=both one to compare with; with
`spare_decode`, a second decode server) on one event-loop thread, over tcp or inproc, with a feature sender standing
in for a vision server. Waiting is on the servers' state conditions, never on sleeps; `close()` stops everything it
started. The prefill server's hold timeout is long unless given: a test releases (or aborts) what it holds."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import torch
from prometheus_client.parser import text_string_to_metric_families

from dvd.language_server.config import EngineConfig
from dvd.language_server.metrics import STATS
from dvd.language_server.model import LanguageHalf
from dvd.language_server.server import LanguageServer
from dvd.language_server.server_config import LanguageServerConfig
from dvd.transport import InprocHub, Sender, TransportConfig, create_sender, header_for
from dvd.v1 import common_pb2, language_pb2, language_pb2_grpc
from tests.language_server.language_harness import LoopThread, collect

Responses = Iterator[language_pb2.LanguageGenerateResponse]
ENGINE = EngineConfig(block_size=16, num_blocks=256, max_batch_tokens=64, enable_prefix_cache=True)


@dataclasses.dataclass
class Served:
    server: LanguageServer
    channel: grpc.Channel
    stub: language_pb2_grpc.LanguageStub

    def stats(self) -> dict[str, float]:
        return dict(self.stub.Stats(common_pb2.StatsRequest()).counters)


def kv_stats_on_metrics(stub: language_pb2_grpc.LanguageStub) -> dict[str, float]:
    """A quiet language server's P/D Stats (every key naming KV), each checked to be on its Prometheus endpoint (the
    one its Health names) with the same value, by prometheus_client's own parser."""
    url = stub.Health(common_pb2.HealthRequest()).metrics_url
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    scraped = {sample.name: sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if not sample.labels}
    stats = dict(stub.Stats(common_pb2.StatsRequest()).counters)
    table = {stat.key: stat.name + ("_total" if stat.kind == "counter" else "") for stat in STATS}
    kv = {key: value for key, value in stats.items() if "kv" in key}
    assert not kv.keys() - table.keys(), f"P/D Stats not on /metrics: {sorted(kv.keys() - table.keys())}"
    assert {table[key]: scraped.get(table[key]) for key in kv} == {table[key]: value for key, value in kv.items()}
    return kv


class PdHarness(LoopThread):
    def __init__(self, model: Path, language: LanguageHalf, kind: str = "tcp",
                 decode_engine: EngineConfig = ENGINE, prefill_engine: EngineConfig = ENGINE,
                 spare_decode: EngineConfig | None = None, **overrides: Any) -> None:
        self.kind = kind
        self.options: dict[str, Any] = {"hub": InprocHub()} if kind == "inproc" else {}
        super().__init__("pd-test-loop")
        self.servers: dict[str, Served] = {}
        overrides.setdefault("kv_hold_timeout_s", 600.0)
        roles = [("prefill", prefill_engine), ("decode", decode_engine), ("both", ENGINE)]
        if spare_decode is not None:
            roles.append(("spare", spare_decode))
        for name, engine in roles:
            role = "decode" if name == "spare" else name
            config = LanguageServerConfig(model=model, engine=engine, role=role,
                                          transport=TransportConfig(kind=kind), features_timeout_s=60.0, **overrides)
            server = self.call(self._start(config, language))
            channel = grpc.insecure_channel(server.address)
            self.servers[name] = Served(server, channel, language_pb2_grpc.LanguageStub(channel))
        self.sender: Sender = self.call(self._sender())

    async def _start(self, config: LanguageServerConfig, language: LanguageHalf) -> LanguageServer:
        server = LanguageServer(config, self.options, language=language)
        await server.start()
        return server

    async def _sender(self) -> Sender:
        return create_sender(TransportConfig(kind=self.kind), **self.options)

    @property
    def prefill(self) -> Served:
        return self.servers["prefill"]

    @property
    def decode(self) -> Served:
        return self.servers["decode"]

    @property
    def both(self) -> Served:
        return self.servers["both"]

    def release(self, request_id: str) -> bool:
        """What the gateway sends the prefill server at the decode server's first message: free the held KV."""
        return self.prefill.stub.ReleaseKv(language_pb2.ReleaseKvRequest(request_id=request_id)).found

    def collect_releasing(self, stream: Responses, request_id: str) -> tuple[list[int], str]:
        """A decode server's stream, the prefill server's held KV released at its first message (as the gateway
        does)."""
        messages = iter(stream)
        first = next(messages, None)
        if first is None:
            return [], ""
        self.release(request_id)
        tokens, reason = collect(messages)
        return [*first.token_ids, *tokens], reason or first.finish_reason

    def send(self, to: Served, request_id: str, slot: int, features: torch.Tensor) -> None:
        header = header_for(request_id, slot, 256, features)
        self.call(self.sender.send(to.server.receiver.address, header, features))

    def wait_until(self, served: Served, predicate: Callable[[], bool], timeout_s: float = 60.0) -> None:
        self.wait_on(served.server, predicate, timeout_s)

    def split(self, request: language_pb2.LanguageGenerateRequest) -> tuple[Responses, Responses]:
        """Generate on the prefill server (naming the decode server) and on the decode server at the same moment,
        as the gateway does."""
        to_prefill = language_pb2.LanguageGenerateRequest()
        to_prefill.CopyFrom(request)
        to_prefill.kv_destination = self.decode.server.transport_address
        to_decode = language_pb2.LanguageGenerateRequest()
        to_decode.CopyFrom(request)
        to_decode.kv_source = True  # its segments go along unused: the hand-off carries the expanded prompt
        return self.prefill.stub.Generate(to_prefill), self.decode.stub.Generate(to_decode)

    def generate_split(self, request: language_pb2.LanguageGenerateRequest,
                       features: list[torch.Tensor] = (), release: bool = True  # type: ignore[assignment]
                       ) -> tuple[list[int], str]:
        """The request's tokens and finish reason, prefill's first then decode's; `release`: the prefill server's
        held KV freed at the decode server's first message, as the gateway does."""
        prefill, decode = self.split(request)
        for slot, rows in enumerate(features):
            self.send(self.prefill, request.request_id, slot, rows)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(collect, prefill)
            rest = pool.submit(self.collect_releasing, decode, request.request_id) if release else \
                pool.submit(collect, decode)
            (tokens, reason), (more, final) = first.result(120), rest.result(120)
        assert len(tokens) == 1 and reason == "", (tokens, reason)  # handed off after the first token
        return tokens + more, final

    def close(self) -> None:
        for served in self.servers.values():
            served.channel.close()
        self.call(self.sender.close())
        for served in self.servers.values():
            self.call(served.server.stop())
        self.stop_loop()
