"""W3C trace context, and OpenTelemetry spans when `tracing.otlp_endpoint` is set (the [otel] extra).

`traceparent` (https://www.w3.org/TR/trace-context/) is read from every request that carries
one, so the decision log line names the trace and the caller's span (Envoy's, Istio's), and the
line can be joined to the proxy's trace without any exporter. With an OTLP endpoint configured,
the service also exports its own spans: one per check, a child of the caller's span, and one per
introspection call and per JWKS or discovery fetch, children of the check that caused them.

With tracing off (the default), nothing here runs on the Check path: the decision log's writer
thread parses the traceparent (`parse_traceparent`) off the loop, and `Spans.off()` records nothing
and imports nothing of OpenTelemetry.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, NamedTuple

from authz_service.model import Decision, HttpRequest, Outcome

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


_VERSION_00 = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def trace_ids(value: str) -> tuple[str, str] | None:
    """(trace_id, span_id) of a traceparent, exactly when `parse_traceparent` accepts it: the
    decision log's writer thread calls it per traced line, so the common version-00 header takes
    a shorter path (one anchored match, two slices; about half of parse_traceparent's cost)."""
    if len(value) == 55 and _VERSION_00.fullmatch(value):
        trace_id, span_id = value[3:35], value[36:52]
        return None if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN else (trace_id, span_id)
    parsed = parse_traceparent(value)
    return None if parsed is None else (parsed.trace_id, parsed.span_id)


class Spans:
    """Where spans go: nowhere (`Spans.off()`), or an OTLP/gRPC collector.

    One instance per process, built from the config when the service starts (`tracing` takes effect
    at a restart, as `server` does); it owns its own TracerProvider (never OpenTelemetry's global
    one), so tests and processes do not share it. The engine holds it only when it exports
    (`Engine.spans` is None otherwise: a disabled Check pays one None check), and the
    UpstreamClient holds it for the outgoing calls.

    What a span may carry: labels (protocol, decision, reason, introspector and policy ids), the
    request id as the decision log writes it, an IdP URL without userinfo, query or fragment.
    Never a token, a claim, a request path (its query may carry a token), nor an exception's text:
    exceptions are not recorded, the outcome label is.
    """

    def __init__(self, tracer: Any = None, provider: Any = None) -> None:
        self._tracer = tracer
        self._provider = provider
        if tracer is not None:
            from opentelemetry import trace
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

            self._propagator = TraceContextTextMapPropagator()
            self._server, self._client = trace.SpanKind.SERVER, trace.SpanKind.CLIENT
            self._error = trace.StatusCode.ERROR
            self._status: Any = trace.Status

    @classmethod
    def off(cls) -> Spans:
        """No spans: every method is a no-op."""
        return cls()

    @classmethod
    def otlp(
        cls,
        endpoint: str,
        service_name: str = "authz-service",
        sample_ratio: float = 1.0,
    ) -> Spans:
        """Spans exported in batches to an OTLP/gRPC endpoint (`http://host:4317`; https:// for TLS).

        Sampling follows the caller: a traceparent's sampled flag decides (Envoy's or Istio's
        sampling rules once for the whole trace); `sample_ratio` applies to traces that start
        here (checks without a traceparent, background key fetches). A finished span waits at
        most OTEL_BSP_SCHEDULE_DELAY ms (the SDK's variable, 5000 by default) for its batch."""
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        except ImportError as err:  # pragma: no cover - config validation refuses the endpoint first
            raise RuntimeError("tracing.otlp_endpoint needs the otel extra: pip install 'authz-service[otel]'") from err
        provider = TracerProvider(
            resource=Resource.create({"service.name": service_name}),
            sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
        )
        # A collector that is down must not hold a stop for long: each export gives up after 5 s.
        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://"), timeout=5)
        provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider.get_tracer("authz_service"), provider)

    @property
    def enabled(self) -> bool:
        """Whether spans are recorded at all."""
        return self._tracer is not None

    async def check(
        self,
        decide: Callable[[HttpRequest], Awaitable[Decision]],
        request: HttpRequest,
        protocol: str,
        request_id: str,
    ) -> Decision:
        """`decide(request)` inside a server span `authz.check`, a child of the caller's span when
        the request carries a traceparent; the calls it makes (introspection, key fetches) are the
        span's children through OpenTelemetry's context (a contextvar): nothing is passed down.
        `request_id`: as the decision log writes it (redacted)."""
        if self._tracer is None:
            return await decide(request)
        headers = request.headers
        carrier = {name: headers[name] for name in ("traceparent", "tracestate") if name in headers}
        parent = self._propagator.extract(carrier) if carrier else None
        with self._tracer.start_as_current_span(
            "authz.check",
            context=parent,
            kind=self._server,
            attributes={"authz.protocol": protocol, "authz.request_id": request_id},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            decision = await decide(request)
            if span.is_recording():
                attributes = {"authz.decision": decision.outcome.value, "authz.reason": decision.reason.label}
                if decision.introspector is not None:
                    attributes["authz.introspector"] = decision.introspector
                if decision.policy is not None:
                    attributes["authz.policy"] = decision.policy
                span.set_attributes(attributes)
                if decision.outcome is Outcome.UNAVAILABLE:
                    span.set_status(self._status(self._error, decision.reason.label))
        return decision

    @contextlib.contextmanager
    def call(self, endpoint: str, method: str, url: str) -> Iterator[Any]:
        """A client span `authz.<endpoint>` (introspection, jwks, discovery) for one outgoing call,
        a child of the current span (a root span for background fetches). `url`: already without
        userinfo, query or fragment."""
        if self._tracer is None:
            yield None
            return
        with self._tracer.start_as_current_span(
            f"authz.{endpoint}",
            kind=self._client,
            attributes={"http.request.method": method, "url.full": url, "authz.endpoint": endpoint},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            yield span

    def outcome(self, span: Any, outcome: str, status: int | None = None) -> None:
        """Say how a call span's call ended: "ok", or the failure label the metrics count."""
        if span is None or not span.is_recording():
            return
        span.set_attribute("authz.outcome", outcome)
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        if outcome not in ("ok", "invalid_token"):  # invalid_token: an answer about the token, not a failure
            span.set_status(self._status(self._error, outcome))

    def shutdown(self, timeout_millis: int = 2000) -> None:
        """Export what is buffered and stop (at service stop). Blocking: run it off the loop."""
        provider, self._provider = self._provider, None
        if provider is not None:
            provider.force_flush(timeout_millis)
            provider.shutdown()
