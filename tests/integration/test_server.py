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
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from authz_service.devstack.idp import DevIdentityProvider
from tests.conftest import StartService, jwks_introspector

SERVICE = "envoy.service.auth.v3.Authorization"


async def test_health_check_and_watch(idp: DevIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    stub = health_pb2_grpc.HealthStub(service.channel)
    for name in ("", SERVICE):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    watch = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE))
    first = await watch.read()
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    # Draining flips every service to NOT_SERVING, and watchers are told.
    await service.service.health.enter_graceful_shutdown()
    second = await asyncio.wait_for(watch.read(), 5)
    assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()


async def test_reflection_lists_the_services(idp: DevIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    stub = reflection_pb2_grpc.ServerReflectionStub(service.channel)
    call = stub.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    reply = await call.read()
    names = {s.name for s in reply.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names
    await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE))
    reply = await call.read()
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
    idp: DevIdentityProvider, start_service: StartService, caplog: pytest.LogCaptureFixture
) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    introspector = service.service.engine.introspectors["idp"]
    original = introspector.introspect

    async def explode(token: Any) -> Any:
        raise RuntimeError("boom " + "SECRET-IN-MESSAGE")

    introspector.introspect = explode  # type: ignore[method-assign]
    token = idp.mint()
    answer = await service.check(token=token)
    assert (answer.code, answer.http_status) == (14, 503)
    assert answer.response.status.message == "internal_error"
    logged = caplog.text
    assert "RuntimeError" in logged and "SECRET-IN-MESSAGE" not in logged and token not in logged
    introspector.introspect = original  # type: ignore[method-assign]
    assert (await service.check(token=token)).allowed


async def test_garbage_request_bytes_are_rejected_cleanly(
    idp: DevIdentityProvider, start_service: StartService
) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    check = service.channel.unary_unary(
        "/envoy.service.auth.v3.Authorization/Check", request_serializer=_identity, response_deserializer=_identity
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await check(b"\xff\xff\xff\xff not a protobuf")
    # grpc answers UNKNOWN for an undecodable request; Envoy turns any error into a deny.
    assert err.value.code() != grpc.StatusCode.OK
    assert (await service.check(token=idp.mint())).allowed  # still serving
