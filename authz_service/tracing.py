"""W3C trace context, and OpenTelemetry spans when `tracing.otlp_endpoint` is set (the [otel] extra).

`traceparent` (https://www.w3.org/TR/trace-context/) is read from every request that carries
one, so the decision log line names the trace and the caller's span (Envoy's, Istio's), and the
line can be joined to the proxy's trace without any exporter. With an OTLP endpoint configured,
the service also exports its own spans: one per check, a child of the caller's span, and one per
introspection call and per JWKS or discovery fetch, children of the check that caused them.

With tracing off (the default), nothing here runs on the Check path but `parse_traceparent` on
requests that carry the header: `Spans.off()` returns no spans and imports nothing of OpenTelemetry.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:-.*)?")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


class TraceParent(NamedTuple):
    """The caller's trace and span, as a traceparent header names them (lower-case hex)."""

    trace_id: str
    span_id: str
    sampled: bool


def parse_traceparent(value: str | None) -> TraceParent | None:
    """The trace context of a `traceparent` header; None when absent or not valid (W3C level 1:
    version ff and all-zero ids are invalid; a future version may append fields)."""
    if not value or len(value) > 512:
        return None
    match = _TRACEPARENT.fullmatch(value.strip())
    if match is None:
        return None
    version, trace_id, span_id, flags = match.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    if version == "00" and len(value.strip()) != 55:
        return None  # version 00 has exactly four fields
    return TraceParent(trace_id, span_id, bool(int(flags, 16) & 1))


class Spans:
    """Where spans go: nowhere (`Spans.off()`), or an OTLP/gRPC collector.

    One instance per process, built from the config and passed down by the engine wiring; it owns
    its own TracerProvider (never OpenTelemetry's global one), so tests and reloads do not share it.
    """

    def __init__(self, tracer: Any = None, provider: Any = None) -> None:
        self._tracer = tracer
        self._provider = provider

    @classmethod
    def off(cls) -> Spans:
        """No spans: every method is a no-op."""
        return cls()

    @classmethod
    def otlp(cls, endpoint: str, service_name: str = "authz-service") -> Spans:
        """Spans exported in batches to an OTLP/gRPC endpoint (`http://host:4317`; https:// for TLS)."""
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as err:  # pragma: no cover - the extra is part of the locked test environment
            raise RuntimeError("tracing.otlp_endpoint needs the otel extra: pip install 'authz-service[otel]'") from err
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://")))
        )
        return cls(provider.get_tracer("authz_service"), provider)

    @property
    def enabled(self) -> bool:
        """Whether spans are recorded at all."""
        return self._tracer is not None

    @contextlib.contextmanager
    def check(self, protocol: str, headers: Mapping[str, str]) -> Iterator[Any]:
        """A span for one check, a child of the caller's span when the request carries traceparent."""
        if self._tracer is None:
            yield None
            return
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        parent = TraceContextTextMapPropagator().extract(
            {name: headers[name] for name in ("traceparent", "tracestate") if name in headers}
        )
        with self._tracer.start_as_current_span(
            "authz.check", context=parent, attributes={"authz.protocol": protocol}
        ) as span:
            yield span

    @contextlib.contextmanager
    def call(self, name: str, **attributes: str) -> Iterator[Any]:
        """A span for an outgoing call (introspection, JWKS, discovery), a child of the current span."""
        if self._tracer is None:
            yield None
            return
        with self._tracer.start_as_current_span(name, attributes=attributes) as span:
            yield span

    def shutdown(self, timeout_millis: int = 2000) -> None:
        """Export what is buffered and stop (at service stop)."""
        if self._provider is not None:
            self._provider.force_flush(timeout_millis)
            self._provider.shutdown()
