"""The gRPC shell: health, reflection, the exact method path, wire compatibility, fail-closed."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from envoy_data_plane.envoy.config.core.v3 import Address, SocketAddress
from envoy_data_plane.envoy.service.auth.v3 import (
    AttributeContext,
    AttributeContextHttpRequest,
    AttributeContextPeer,
    AttributeContextRequest,
    CheckRequest,
    CheckResponse,
)
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from authz_service._pb.envoy.service.auth.v3 import external_auth_pb2 as pb
from authz_service.decisionlog import log_internal_error
from authz_service.decisionlog import log_via_logging as log_decision
from authz_service.devstack.idp import DevIdentityProvider
from authz_service.model import Decision, Identity, Outcome
from authz_service.server import grpc as grpc_shell
from authz_service.server.grpc import AuthorizationServicer
from authz_service.tokens.base import Credential
from tests.conftest import StartService, jwks_introspector
from tests.harness import Answer, HealthClient, check_request, watched_status

SERVICE = "envoy.service.auth.v3.Authorization"


async def test_health_check_and_watch(idp: DevIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    stub = HealthClient(service.channel)
    for name in ("", SERVICE):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    watch = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE))
    assert await watched_status(watch) == health_pb2.HealthCheckResponse.SERVING
    # Draining flips every service to NOT_SERVING, and watchers are told.
    await service.service.health.enter_graceful_shutdown()
    assert await watched_status(watch, 5) == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()


async def test_reflection_lists_the_services(idp: DevIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    # The method grpcurl calls (the typed ServerReflectionStub only takes a sync channel).
    reflect = service.channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    call = reflect()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    reply = await call.read()
    assert isinstance(reply, reflection_pb2.ServerReflectionResponse), reply
    names = {s.name for s in reply.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names
    await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE))
    reply = await call.read()
    assert isinstance(reply, reflection_pb2.ServerReflectionResponse), reply
    assert reply.file_descriptor_response.file_descriptor_proto  # grpcurl can describe Check
    await call.done_writing()


def _identity(data: bytes) -> bytes:
    return data


async def test_envoy_data_plane_wire_compatibility(idp: DevIdentityProvider, start_service: StartService) -> None:
    """An independent Envoy API implementation encodes the request and decodes our answers."""
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    # The exact path Envoy calls; raw bytes in and out, so only the wire format is shared.
    check = service.channel.unary_unary(
        "/envoy.service.auth.v3.Authorization/Check", request_serializer=_identity, response_deserializer=_identity
    )

    def request(headers: dict[str, str]) -> bytes:
        return bytes(
            CheckRequest(
                attributes=AttributeContext(
                    source=AttributeContextPeer(
                        address=Address(socket_address=SocketAddress(address="10.1.2.3", port_value=5555))
                    ),
                    request=AttributeContextRequest(
                        http=AttributeContextHttpRequest(
                            id="abc",
                            method="POST",
                            path="/fhir/Patient?name=x",
                            host="api.local",
                            scheme="https",
                            protocol="HTTP/2",
                            headers={":path": "/fhir/Patient?name=x", **headers},
                        )
                    ),
                    context_extensions={"route": "fhir"},
                )
            )
        )

    allowed: Any = CheckResponse.parse(await check(request({"authorization": f"Bearer {idp.mint({'sub': 'pat'})}"})))
    assert allowed.status.code == 0
    header_map = {h.header.key: h for h in allowed.ok_response.headers}
    assert header_map["x-user-id"].header.value == "pat"
    assert header_map["x-user-id"].append is False  # present and false, not merely absent
    assert allowed.dynamic_metadata.fields["user_id"].string_value == "pat"

    denied: Any = CheckResponse.parse(await check(request({})))
    assert denied.status.code == 16
    assert int(denied.denied_response.status.code) == 401
    assert {h.header.key for h in denied.denied_response.headers} == {"www-authenticate", "content-type"}


async def test_unexpected_error_denies_and_server_keeps_serving(
    idp: DevIdentityProvider,
    start_service: StartService,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    introspector = service.service.engine.introspectors["idp"]

    async def explode(credential: Credential) -> Identity:
        raise RuntimeError("boom " + "SECRET-IN-MESSAGE")

    monkeypatch.setattr(introspector, "introspect", explode)  # a bug deep inside: Check must still answer
    token = idp.mint()
    answer = await service.check(token=token)
    assert (answer.code, answer.http_status) == (14, 503)
    assert answer.response.status.message == "internal_error"
    logged = caplog.text
    assert "RuntimeError" in logged
    assert "SECRET-IN-MESSAGE" not in logged
    assert token not in logged
    monkeypatch.undo()
    assert (await service.check(token=token)).allowed


class _WaitingCaller:
    """The one thing Check asks of its context: how long the caller still waits (no deadline)."""

    def time_remaining(self) -> float | None:
        return None


async def test_checks_are_counted_in_flight_until_answered(
    idp: DevIdentityProvider, start_service: StartService, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    servicer = AuthorizationServicer(
        service.service.current_engine,
        service.service.metrics,
        log_decision=log_decision,
        log_internal_error=log_internal_error,
    )
    introspector = service.service.engine.introspectors["idp"]
    verify = introspector.introspect
    entered, release = asyncio.Event(), asyncio.Event()

    async def held(credential: Credential) -> Identity:
        entered.set()
        await release.wait()
        return await verify(credential)

    monkeypatch.setattr(introspector, "introspect", held)
    raw = check_request("/x", token=idp.mint()).SerializeToString()
    caller: Any = _WaitingCaller()
    pending = asyncio.ensure_future(servicer.Check(raw, caller))
    await entered.wait()
    assert servicer.runner.in_flight == 1
    release.set()
    assert Answer.of(pb.CheckResponse.FromString(await pending)).allowed
    assert servicer.runner.in_flight == 0


async def test_an_allow_that_cannot_be_counted_is_not_sent(
    idp: DevIdentityProvider, start_service: StartService, caplog: pytest.LogCaptureFixture
) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    counted: list[Decision] = []

    class BrokenMetrics:
        def observe(self, decision: Decision, seconds: float, protocol: str) -> None:
            if decision.outcome is Outcome.ALLOW:
                raise RuntimeError("metrics down")
            counted.append(decision)

    servicer = AuthorizationServicer(
        service.service.current_engine,
        BrokenMetrics(),
        log_decision=log_decision,
        log_internal_error=log_internal_error,
    )
    caller: Any = _WaitingCaller()
    raw = check_request("/x", token=idp.mint()).SerializeToString()
    answer = Answer.of(pb.CheckResponse.FromString(await servicer.Check(raw, caller)))
    assert (answer.http_status, answer.response.status.message) == (503, "internal_error")
    assert "RuntimeError" in caplog.text
    denied = Answer.of(
        pb.CheckResponse.FromString(await servicer.Check(check_request("/x").SerializeToString(), caller))
    )
    assert (denied.http_status, [d.reason.label for d in counted]) == (401, ["missing_token"])
    assert servicer.runner.in_flight == 0


async def test_an_adapter_that_raises_denies_and_server_keeps_serving(
    idp: DevIdentityProvider, start_service: StartService, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})

    def broken_adapter(raw: bytes) -> Any:
        raise ValueError("adapter bug")

    monkeypatch.setattr(grpc_shell, "decode_check", broken_adapter)  # outside the Authorizer
    answer = await service.check(token=idp.mint())
    assert (answer.http_status, answer.response.status.message) == (503, "internal_error")
    monkeypatch.undo()
    assert (await service.check(token=idp.mint())).allowed


def _with_bad_utf8_method() -> bytes:
    """A CheckRequest whose attributes.request.http.method is the bytes 0xff 0xfe (not UTF-8)."""
    http = b"\x12\x02\xff\xfe"  # HttpRequest.method = field 2, length-delimited
    request = b"\x12" + bytes([len(http)]) + http  # Request.http = field 2
    attributes = b"\x22" + bytes([len(request)]) + request  # AttributeContext.request = field 4
    return b"\x0a" + bytes([len(attributes)]) + attributes  # CheckRequest.attributes = field 1


async def test_garbage_request_bytes_are_rejected_cleanly(
    idp: DevIdentityProvider, start_service: StartService
) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    check = service.channel.unary_unary(
        "/envoy.service.auth.v3.Authorization/Check", request_serializer=_identity, response_deserializer=_identity
    )
    # A message that does not decode, and one whose string field holds invalid UTF-8 (http.method,
    # field 2 of HttpRequest: bytes 0xff 0xfe). Both are a 400 answer, not a failed call.
    for raw in (b"\xff\xff\xff\xff not a protobuf", _with_bad_utf8_method()):
        answer = Answer.of(pb.CheckResponse.FromString(await check(raw)))
        assert answer.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert answer.http_status == 400
        assert answer.response.status.message == "undecodable_request"
    assert (await service.check(token=idp.mint())).allowed  # still serving
