"""OpenTelemetry traces (dvd/tracing.py): one image request through `dvd serve`, configured only by OTEL_*
variables, makes one trace with spans from the gateway, the vision server and the language server, which a
tiny OTLP/HTTP receiver in this test collects; with no OTEL_* variable nothing is recorded or imported."""

from __future__ import annotations

import base64
import http.server
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import encode, photo_like
from tests.serve_process import ServeProcess, post_chat

pytest.importorskip("opentelemetry.sdk")
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dvd.tracing import (
    NO_TRACER,
    OtelTracer,
    TraceContext,
    TracingConfigError,
    configured_exporter,
    tracer_from_environment,
)

IMAGE = "data:image/jpeg;base64," + base64.b64encode(encode(photo_like(600, 400, 1), "JPEG")).decode()
STAGES = {"chat", "Encode", "preprocess", "vit", "send", "Generate", "receive", "queue", "prefill", "decode"}


class OtlpReceiver:
    """An OTLP/HTTP trace endpoint on loopback: every span it is sent, with its resource's attributes."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.changed = threading.Condition()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.take(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def take(self, request: Any) -> None:
        with self.changed:
            for resource_spans in request.resource_spans:
                resource = {a.key: a.value for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        self.spans.append({"name": span.name, "trace": span.trace_id.hex(), "id": span.span_id.hex(),
                                           "parent": span.parent_span_id.hex(),
                                           "role": resource["dvd.role"].string_value,
                                           "pid": resource["process.pid"].int_value})
            self.changed.notify_all()

    def wait_until(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout_s: float) -> list[dict[str, Any]]:
        with self.changed:
            assert self.changed.wait_for(lambda: predicate(self.spans), timeout_s), self.spans
            return list(self.spans)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def test_one_image_request_is_one_trace_across_the_three_processes(tiny_hf: Path) -> None:
    receiver = OtlpReceiver()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
           "OTEL_BSP_SCHEDULE_DELAY": "100"}
    body = {"model": "tiny-hf", "max_tokens": 3, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": IMAGE}}, {"type": "text", "text": "What is it?"}]}]}
    try:
        with ServeProcess("--model", str(tiny_hf), env=env) as served:
            assert post_chat(served.http_url, body)[0] == 200
            spans = receiver.wait_until(lambda spans: {s["name"] for s in spans} >= STAGES, 60)
    finally:
        receiver.close()
    by_name = {s["name"]: s for s in spans}
    root = by_name["chat"]
    assert {s["trace"] for s in spans if s["name"] in STAGES} == {root["trace"]}  # one trace
    assert root["parent"] == "" and root["role"] == "gateway"
    roles = {s["role"]: s["pid"] for s in spans}
    assert sorted(roles) == ["gateway", "language", "vision"] and len(set(roles.values())) == 3  # three processes

    def parent(name: str) -> str:
        return next(s["name"] for s in spans if s["id"] == by_name[name]["parent"])

    assert parent("Encode") == parent("Generate") == "chat"  # context in gRPC metadata
    assert parent("preprocess") == parent("vit") == parent("send") == "Encode"
    assert parent("receive") == "send"  # context in the feature frame's header
    assert parent("queue") == parent("prefill") == parent("decode") == "Generate"
    assert by_name["receive"]["role"] == "language" and by_name["send"]["role"] == "vision"


def test_spans_carry_their_context_across_a_boundary() -> None:
    exporter = InMemorySpanExporter()
    tracer = OtelTracer("test", exporter, batch=False)
    with tracer.span("outer", kind="server", request_id="r1") as outer:
        crossed = TraceContext.from_metadata(outer.context.metadata())  # as a server reads it back
        inner = tracer.record("inner", crossed, 10.0, 10.5, slot=0)
    with pytest.raises(RuntimeError), tracer.span("failing"):
        raise RuntimeError("boom")
    tracer.shutdown()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["inner"].parent.span_id == spans["outer"].context.span_id
    assert spans["inner"].context.trace_id == spans["outer"].context.trace_id
    assert spans["inner"].end_time - spans["inner"].start_time == 500_000_000
    assert spans["inner"].attributes["dvd.slot"] == 0 and spans["outer"].attributes["dvd.request_id"] == "r1"
    assert inner.traceparent.split("-")[1] == outer.context.traceparent.split("-")[1]
    assert not spans["failing"].status.is_ok
    assert spans["outer"].resource.attributes["service.name"] == "dvd-test"


def test_tracing_is_configured_the_opentelemetry_way() -> None:
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    assert configured_exporter({}) == "" and tracer_from_environment("x", {}) is NO_TRACER
    assert configured_exporter(endpoint) == "otlp"
    assert configured_exporter({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://h:4318/v1/traces"}) == "otlp"
    assert configured_exporter({**endpoint, "OTEL_SDK_DISABLED": "true"}) == ""
    assert configured_exporter({**endpoint, "OTEL_TRACES_EXPORTER": "none"}) == ""
    assert configured_exporter({"OTEL_TRACES_EXPORTER": "console"}) == "console"
    with pytest.raises(TracingConfigError, match="OTEL_TRACES_EXPORTER"):
        configured_exporter({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(TracingConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        tracer_from_environment("x", {**endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"})
    assert TraceContext.from_metadata([("traceparent", "not-a-traceparent")]) == TraceContext()


def test_without_otel_variables_nothing_of_opentelemetry_is_imported() -> None:
    code = ("import os, sys; from dvd.tracing import NO_TRACER, tracer_from_environment; "
            "env = {k: v for k, v in os.environ.items() if not k.startswith('OTEL_')}; "
            "assert tracer_from_environment('gateway', env) is NO_TRACER; "
            "import dvd.pipeline.gateway, dvd.vision_server.service, dvd.language_server.server; "
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
