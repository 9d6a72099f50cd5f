"""`tracing.otlp_endpoint`: one request, one trace, exported over OTLP/gRPC to a real receiver.

The receiver is opentelemetry-proto's TraceService on a grpc.aio server at 127.0.0.1:0 (what a
collector listens with); the service under test is the real one with a real IdP (discovery, JWKS
and an RFC 7662 endpoint). A Check that carries a traceparent gets a server span `authz.check`,
a child of the caller's span, and the IdP calls it makes are client spans under it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

# The SDK and the exporter are imported when the service builds its exporter: imported here, before
# any loop runs, so the first test does not pay that import (~0.5 s) on the loop the detector watches.
import aiohttp
import grpc
import opentelemetry.exporter.otlp.proto.grpc.trace_exporter
import opentelemetry.sdk.trace  # noqa: F401
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from tests.conftest import StartService, jwks_introspector, opaque_introspector, sleep_past
from tests.harness import Harness, config_from
from tests.hostile_idp import HostileIdentityProvider

SERVER, CLIENT = trace_pb2.Span.SPAN_KIND_SERVER, trace_pb2.Span.SPAN_KIND_CLIENT


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps every span it is sent, with its service.name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, trace_pb2.Span]] = []
        self._arrived = asyncio.Event()

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            service = next(
                (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), ""
            )
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend((service, span) for span in scope_spans.spans)
        self._arrived.set()
        return trace_service_pb2.ExportTraceServiceResponse()

    async def wait_for(self, done: Callable[[list[trace_pb2.Span]], bool], timeout: float = 15.0) -> None:
        """Until `done(spans)` holds: woken by each export, never polling."""
        async with asyncio.timeout(timeout):
            while not done([span for _, span in self.spans]):
                self._arrived.clear()
                await self._arrived.wait()


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    server = grpc.aio.server()
    collected = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collected, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield collected, f"http://127.0.0.1:{port}"
    await server.stop(0)


def attributes(span: trace_pb2.Span) -> dict[str, Any]:
    """A span's attributes as plain values."""
    values: dict[str, Any] = {}
    for attribute in span.attributes:
        kind = attribute.value.WhichOneof("value")
        values[attribute.key] = getattr(attribute.value, kind) if kind else None
    return values


def traceparent(trace_id: str, span_id: str) -> str:
    return f"00-{trace_id}-{span_id}-01"


def check_span(spans: list[trace_pb2.Span], trace_id: str) -> trace_pb2.Span | None:
    found = [s for s in spans if s.name == "authz.check" and s.trace_id.hex() == trace_id]
    assert len(found) <= 1, found
    return found[0] if found else None


def children(spans: list[trace_pb2.Span], parent: trace_pb2.Span) -> dict[str, trace_pb2.Span]:
    """The spans whose parent is `parent`, by name (one each)."""
    found = [s for s in spans if s.parent_span_id == parent.span_id and s.trace_id == parent.trace_id]
    by_name = {s.name: s for s in found}
    assert len(by_name) == len(found), [s.name for s in found]
    return by_name


@pytest.mark.parametrize("protocol", ["grpc", "http"])
async def test_a_check_with_a_traceparent_exports_its_span_tree(
    protocol: str,
    idp: HostileIdentityProvider,
    receiver: tuple[Receiver, str],  # before start_service: it outlives the service's final flush
    start_service: StartService,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    collected, endpoint = receiver
    # Batches leave every 50 ms instead of the SDK's 5 s (read when the service builds its exporter).
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    oidc = {"id": "oidc", "type": "jwt", "discovery": True, "jwt": {"iss": idp.issuer, "aud": "authz-service"}}
    harness = await start_service(
        {
            "server": {"grpc_address": "127.0.0.1:0", "admin_address": None, "http_address": "127.0.0.1:0"},
            "introspectors": [oidc, opaque_introspector(idp)],
            "tracing": {"otlp_endpoint": endpoint, "service_name": "authz-under-test"},
        }
    )
    secret_sub = "subject-that-must-not-leak"
    opaque = idp.issue_opaque({"sub": secret_sub})
    # The next JWT names a kid the service has not seen: the check fetches discovery and the JWKS again.
    await asyncio.to_thread(idp.rotate)
    jwt = idp.mint({"sub": secret_sub})
    trace_a, caller_a = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    trace_b, caller_b = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"

    caplog.set_level(logging.INFO, logger="authz_service.decision")
    requests = ((opaque, trace_a, caller_a, "req-a"), (jwt, trace_b, caller_b, "req-b"))
    for token, trace_id, caller, request_id in requests:
        headers = {"traceparent": traceparent(trace_id, caller), "x-request-id": request_id}
        assert await send(protocol, harness, token, headers) == 200

    await collected.wait_for(lambda spans: all(check_span(spans, t) is not None for t in (trace_a, trace_b)))
    spans = [span for _, span in collected.spans]

    # Opaque token: the check is a server span under the caller's, the introspection a client span under it.
    check_a = check_span(spans, trace_a)
    assert check_a is not None
    assert (check_a.parent_span_id.hex(), check_a.kind) == (caller_a, SERVER)
    assert attributes(check_a) == {
        "authz.protocol": protocol,
        "authz.request_id": "req-a",
        "authz.decision": "allow",
        "authz.reason": "allowed",
        "authz.introspector": "opaque",
    }
    (introspection,) = children(spans, check_a).values()
    assert (introspection.name, introspection.kind) == ("authz.introspection", CLIENT)
    assert attributes(introspection) == {
        "http.request.method": "POST",
        "url.full": idp.introspection_url,
        "authz.endpoint": "introspection",
        "authz.outcome": "ok",
        "http.response.status_code": 200,
    }

    # A JWT whose kid is new: discovery and the JWKS are fetched inside the check, as its children.
    check_b = check_span(spans, trace_b)
    assert check_b is not None
    assert (check_b.parent_span_id.hex(), check_b.kind) == (caller_b, SERVER)
    assert attributes(check_b)["authz.introspector"] == "oidc"
    fetches = children(spans, check_b)
    assert sorted(fetches) == ["authz.discovery", "authz.jwks"]
    assert attributes(fetches["authz.jwks"])["url.full"] == idp.jwks_uri
    assert attributes(fetches["authz.discovery"])["url.full"] == idp.discovery_url
    assert all(span.kind == CLIENT and attributes(span)["authz.outcome"] == "ok" for span in fetches.values())

    # The start-up fetch belongs to no request: a root span of its own trace.
    startup = [s for s in spans if s.name == "authz.jwks" and s.trace_id.hex() not in (trace_a, trace_b)]
    assert startup
    assert all(s.parent_span_id == b"" for s in startup)

    assert {service for service, _ in collected.spans} == {"authz-under-test"}
    for span in spans:
        exported = span.SerializeToString()
        for secret in (opaque, jwt, secret_sub, idp.client_secret):
            assert secret.encode() not in exported, span.name

    # The decision lines name the caller's trace and span: the join from the log to the trace.
    decisions = [getattr(r, "fields", {}) for r in caplog.records if r.name == "authz_service.decision"]
    lines = {fields["request_id"]: fields for fields in decisions}
    assert (lines["req-a"]["trace_id"], lines["req-a"]["span_id"]) == (trace_a, caller_a)
    assert (lines["req-b"]["trace_id"], lines["req-b"]["span_id"]) == (trace_b, caller_b)


async def send(protocol: str, harness: Harness, token: str, headers: dict[str, str]) -> int:
    """One check over `protocol`; its HTTP status."""
    if protocol == "grpc":
        return (await harness.check("/orders/1", token=token, headers=headers)).http_status
    assert harness.service.http is not None
    url = f"http://127.0.0.1:{harness.service.http.port}/ext_authz/orders/1"
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(url, headers={"Authorization": f"Bearer {token}", **headers}) as response,
    ):
        return response.status


async def test_a_background_key_refresh_is_a_trace_of_its_own(
    idp: HostileIdentityProvider,
    receiver: tuple[Receiver, str],  # before start_service: it outlives the service's final flush
    start_service: StartService,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    collected, endpoint = receiver
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    harness = await start_service(
        {
            "introspectors": [jwks_introspector(idp, cache_ttl=1, max_stale=60)],
            "tracing": {"otlp_endpoint": endpoint},
        }
    )
    # Past 80% of cache_ttl since the start-up fetch (within max_stale): the next check is served
    # from the keys it has, and starts a refresh it does not wait for.
    await sleep_past(time.time() + 0.85)
    trace_id, caller = "5b8aa5a2d2c872e8321cf37308d69df2", "051581bf3cb55c13"
    answer = await harness.check("/a", token=idp.mint(), headers={"traceparent": traceparent(trace_id, caller)})
    assert answer.allowed

    def refreshed(spans: list[trace_pb2.Span]) -> bool:
        fetches = [s for s in spans if s.name == "authz.jwks"]
        return check_span(spans, trace_id) is not None and len(fetches) >= 2  # start-up, then the refresh

    await collected.wait_for(refreshed)
    spans = [span for _, span in collected.spans]
    check = check_span(spans, trace_id)
    assert check is not None
    assert children(spans, check) == {}  # the refresh is not part of this request's trace
    fetches = [s for s in spans if s.name == "authz.jwks"]
    assert [s.parent_span_id for s in fetches] == [b""] * len(fetches)  # each a root span
    assert len({s.trace_id for s in fetches}) == len(fetches)  # each a trace of its own
    assert idp.hits["jwks"] >= 2


async def test_an_idp_outage_is_an_error_span_with_its_label_and_a_503_check(
    idp: HostileIdentityProvider,
    receiver: tuple[Receiver, str],  # before start_service: it outlives the service's final flush
    start_service: StartService,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    collected, endpoint = receiver
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    harness = await start_service({"introspectors": [opaque_introspector(idp)], "tracing": {"otlp_endpoint": endpoint}})
    idp.introspect_mode = "error500"
    trace_id, caller = "6e0c63257de34c92bf9efcd03927272e", "e457b5a2e4d86bd1"
    token = idp.issue_opaque()
    answer = await harness.check("/a", token=token, headers={"traceparent": traceparent(trace_id, caller)})
    assert answer.http_status == 503

    await collected.wait_for(lambda spans: check_span(spans, trace_id) is not None)
    spans = [span for _, span in collected.spans]
    check = check_span(spans, trace_id)
    assert check is not None
    assert attributes(check)["authz.decision"] == "unavailable"
    assert check.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    (introspection,) = children(spans, check).values()
    assert attributes(introspection)["authz.outcome"] == "http_500"
    assert introspection.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    assert introspection.status.message == "http_500"
    assert list(introspection.events) == []  # no exception event: its text could quote anything
    for span in spans:
        assert token.encode() not in span.SerializeToString()


async def test_tracing_changes_take_effect_at_a_restart(
    idp: HostileIdentityProvider, start_service: StartService, caplog: pytest.LogCaptureFixture
) -> None:
    harness = await start_service({"introspectors": [opaque_introspector(idp)]})
    assert harness.service.engine.spans is None  # off: Check pays one None test
    traced = config_from(
        {"introspectors": [opaque_introspector(idp)], "tracing": {"otlp_endpoint": "http://127.0.0.1:4317"}}
    )
    with caplog.at_level(logging.WARNING):
        await harness.service.reload(traced)
    assert "config section 'tracing' changed: it takes effect only after a restart" in caplog.text
    assert harness.service.engine.spans is None
    assert harness.service.config.tracing.otlp_endpoint is None
