"""OpenTelemetry traces: the one adapter over the `opentelemetry-*` packages (the `otel` extra), which are
imported only when tracing is configured.

Configured the OpenTelemetry way, from the process's environment when a server starts (never at import):
`OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) or `OTEL_TRACES_EXPORTER` (`otlp`,
`console`) turn it on; `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` keep it off; the protocol
(`OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL`: `http/protobuf`, the spec's default, or `grpc`), headers, timeouts,
certificates, the sampler (`OTEL_TRACES_SAMPLER`), batching (`OTEL_BSP_*`), `OTEL_SERVICE_NAME` and
`OTEL_RESOURCE_ATTRIBUTES` are read by the SDK itself. With none of it set, `tracer_from_environment` gives
`NO_TRACER`, which records nothing and imports nothing. `dvd serve` hands its environment to its children,
`dvd cluster` the `OTEL_*` part of its own to its actors.

One trace per request: the gateway's root span's context travels in gRPC metadata (`traceparent`, W3C
Trace Context) to the vision and language servers, and from a vision server's `send` span in the feature
frame's header to the language server's `receive` span. Stages whose times a server already stamps
(preprocess, ViT, queue, prefill, decode) are recorded after the fact from those stamps (`Tracer.record`),
so the hot paths do no tracing work of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TRACEPARENT, TRACESTATE = "traceparent", "tracestate"
# W3C Trace Context: version-traceid-parentid-flags, lower-case hex (what a frame header may carry).
TRACEPARENT_FORMAT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
_KINDS = ("internal", "server", "client")


@dataclass(frozen=True)
class TraceContext:
    """Where a span sits in its trace, as it crosses a process boundary (W3C Trace Context)."""

    traceparent: str = ""
    tracestate: str = ""

    def __bool__(self) -> bool:
        return bool(self.traceparent)

    def carrier(self) -> dict[str, str]:
        return {k: v for k, v in ((TRACEPARENT, self.traceparent), (TRACESTATE, self.tracestate)) if v}

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """As gRPC metadata (empty without a trace)."""
        return tuple(self.carrier().items())

    @classmethod
    def from_metadata(cls, metadata: Sequence[tuple[str, Any]] | None) -> TraceContext:
        """From a call's invocation metadata; a malformed `traceparent` is ignored, as W3C says."""
        found = {key: value for key, value in metadata or () if key in (TRACEPARENT, TRACESTATE)}
        parent = found.get(TRACEPARENT, "")
        if not isinstance(parent, str) or not TRACEPARENT_FORMAT.match(parent):
            return cls()
        state = found.get(TRACESTATE, "")
        return cls(parent, state if isinstance(state, str) else "")


NO_CONTEXT = TraceContext()


def wall_time(monotonic_s: float) -> float:
    """A `time.monotonic()` stamp on the wall clock (what spans carry), as of now."""
    return time.time() - (time.monotonic() - monotonic_s)


class Span:
    """A started span; `context` is what its children (in this process or another) take as their parent."""

    context: TraceContext = NO_CONTEXT

    def set(self, **attributes: Any) -> None:
        """Attributes learnt while the span runs."""

    def fail(self, error: BaseException) -> None:
        """The span's work failed with `error`."""

    def end(self, end_s: float | None = None) -> None:
        """Ends it now, or at `end_s` (wall-clock seconds)."""


class _NoSpan(Span):
    def __init__(self, parent: TraceContext) -> None:
        self.context = parent  # nothing recorded; the caller's context still passes through


class Tracer:
    """Records nothing (tracing not configured); `OtelTracer` records."""

    enabled = False

    def start(self, name: str, parent: TraceContext = NO_CONTEXT, kind: str = "internal",
              start_s: float | None = None, **attributes: Any) -> Span:
        """A span named `name`, child of `parent` (a new trace without one), started now or at `start_s`."""
        return _NoSpan(parent)

    def record(self, name: str, parent: TraceContext, start_s: float, end_s: float, **attributes: Any) -> TraceContext:
        """A span that already happened, from `start_s` to `end_s` (wall-clock seconds); its context."""
        span = self.start(name, parent, start_s=start_s, **attributes)
        span.end(max(start_s, end_s))
        return span.context

    @contextlib.contextmanager
    def span(self, name: str, parent: TraceContext = NO_CONTEXT, kind: str = "internal",
             **attributes: Any) -> Iterator[Span]:
        """`start` ... `end`, with the span failed by an exception that leaves the block."""
        span = self.start(name, parent, kind, **attributes)
        try:
            yield span
        except (GeneratorExit, asyncio.CancelledError):
            span.set(cancelled=True)  # closed early (a client gone, a stop string): not a failure
            raise
        except BaseException as error:
            span.fail(error)
            raise
        finally:
            span.end()

    def shutdown(self) -> None:
        """Export what is still buffered (servers call it when they stop)."""


NO_TRACER = Tracer()


class _OtelSpan(Span):
    def __init__(self, span: Any, api: Any, propagator: Any) -> None:
        self._span = span
        carrier: dict[str, str] = {}
        propagator.inject(carrier, context=api.set_span_in_context(span))
        self.context = TraceContext(carrier.get(TRACEPARENT, ""), carrier.get(TRACESTATE, ""))
        self._api = api

    def set(self, **attributes: Any) -> None:
        self._span.set_attributes(_attributes(attributes))

    def fail(self, error: BaseException) -> None:
        self._span.record_exception(error)
        self._span.set_status(self._api.Status(self._api.StatusCode.ERROR, f"{type(error).__name__}: {error}"))

    def end(self, end_s: float | None = None) -> None:
        self._span.end(end_time=None if end_s is None else int(end_s * 1e9))


class OtelTracer(Tracer):
    """Spans through the OpenTelemetry SDK, exported by `exporter` (batched, or one by one with `batch=False`,
    as tests with an in-memory exporter want)."""

    enabled = True

    def __init__(self, role: str, exporter: Any, batch: bool = True) -> None:
        from opentelemetry import trace as api
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        attributes: dict[str, str | int] = {"dvd.role": role, "process.pid": os.getpid()}
        if not os.environ.get("OTEL_SERVICE_NAME"):  # the operator's name wins over ours
            attributes[SERVICE_NAME] = f"dvd-{role}"
        # The provider is this object's own, never installed as OpenTelemetry's global one.
        self._provider = TracerProvider(resource=Resource.create(attributes))
        self._provider.add_span_processor((BatchSpanProcessor if batch else SimpleSpanProcessor)(exporter))
        self._tracer = self._provider.get_tracer("dvd")
        self._api, self._propagator = api, TraceContextTextMapPropagator()
        self._kinds = {"internal": api.SpanKind.INTERNAL, "server": api.SpanKind.SERVER,
                       "client": api.SpanKind.CLIENT}

    def start(self, name: str, parent: TraceContext = NO_CONTEXT, kind: str = "internal",
              start_s: float | None = None, **attributes: Any) -> Span:
        context = self._propagator.extract(parent.carrier()) if parent else None
        span = self._tracer.start_span(name, context=context, kind=self._kinds[kind],
                                       attributes=_attributes(attributes),
                                       start_time=None if start_s is None else int(start_s * 1e9))
        return _OtelSpan(span, self._api, self._propagator)

    def shutdown(self) -> None:
        self._provider.shutdown()


def _attributes(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """`request_id=...` -> `dvd.request_id`: DvD's own attribute namespace."""
    return {f"dvd.{key}": value for key, value in attributes.items() if value is not None}


class TracingConfigError(ValueError):
    """Tracing is asked for but cannot be set up: names the variable and what to do."""


def configured_exporter(environ: Mapping[str, str]) -> str:
    """Which exporter the environment asks for: "otlp", "console", or "" (none: tracing off)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ""
    exporters = [e.strip().lower() for e in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()]
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not exporters:
        return "otlp" if endpoint else ""
    if exporters == ["none"]:
        return ""
    unknown = [e for e in exporters if e not in ("otlp", "console")]
    if unknown or len(exporters) > 1:
        raise TracingConfigError(f"OTEL_TRACES_EXPORTER={environ['OTEL_TRACES_EXPORTER']!r}: DvD exports to one of "
                                 "otlp, console or none")
    return exporters[0]


def _exporter(kind: str, environ: Mapping[str, str]) -> Any:
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # type: ignore[assignment, unused-ignore]  # the two exporters are distinct classes where both are installed
    else:
        raise TracingConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: DvD exports over grpc or http/protobuf")
    return OTLPSpanExporter()  # endpoint, headers, timeout, certificate: from the OTEL_* variables


def otel_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The OTEL_* variables of `environ` (this process's): what a deployment hands the processes it starts."""
    environ = os.environ if environ is None else environ
    return {key: value for key, value in environ.items() if key.startswith("OTEL_")}


def tracer_from_environment(role: str, environ: Mapping[str, str] | None = None) -> Tracer:
    """This process's tracer (`role`: gateway, vision, language), as the OTEL_* variables say: NO_TRACER when
    they ask for nothing. TracingConfigError when they ask for what cannot be had (a missing package
    included), naming the variable."""
    environ = os.environ if environ is None else environ
    kind = configured_exporter(environ)
    if not kind:
        return NO_TRACER
    try:
        return OtelTracer(role, _exporter(kind, environ))
    except ImportError as exc:
        raise TracingConfigError(f"OTEL_* variables ask for traces ({kind}), but the OpenTelemetry packages are "
                                 f"missing: pip install 'internvl-dvd[otel]' ({exc})") from None
