"""Test harness: a real grpc.aio AuthzService on 127.0.0.1 and readable CheckRequests."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
import yaml
from grpc_health.v1 import health_pb2

from authz_service._pb.envoy.config.core.v3 import address_pb2
from authz_service._pb.envoy.service.auth.v3 import attribute_context_pb2 as ac
from authz_service._pb.envoy.service.auth.v3 import external_auth_pb2 as pb
from authz_service.config.model import Config
from authz_service.registries import parse_config
from authz_service.server.service import AuthzService

CHECK_METHOD = "/envoy.service.auth.v3.Authorization/Check"
# For channels that poll a server still starting: reconnect every 20-50 ms. With grpc's default
# backoff (1 s, then 1.6 s, ...) a server that binds just after the first attempt is seen ~1 s late.
POLLING_CHANNEL = (
    ("grpc.initial_reconnect_backoff_ms", 20),
    ("grpc.min_reconnect_backoff_ms", 20),
    ("grpc.max_reconnect_backoff_ms", 50),
)

# For a channel that must open its own TCP connection. By default grpc shares subchannels (and so
# one HTTP/2 connection) between all channels of a process to the same address: "a new channel per
# call" to a port that workers share would all ride one connection to one worker, and when that
# worker dies every such channel fails at once until grpc's reconnect backoff (1 s) has passed.
FRESH_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)


class AuthorizationClient:
    """The Authorization stub, typed (the generated one is not): `Check` on the path Envoy calls."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.Check: grpc.aio.UnaryUnaryMultiCallable[pb.CheckRequest, pb.CheckResponse] = channel.unary_unary(
            CHECK_METHOD,
            request_serializer=pb.CheckRequest.SerializeToString,
            response_deserializer=pb.CheckResponse.FromString,
        )


class HealthClient:
    """The grpc.health.v1 stub, typed (types-grpcio-health-checking declares no methods on HealthStub)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        request, response = health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
        self.Check: grpc.aio.UnaryUnaryMultiCallable[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse] = (
            channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=request.SerializeToString,
                response_deserializer=response.FromString,
            )
        )
        self.Watch: grpc.aio.UnaryStreamMultiCallable[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse] = (
            channel.unary_stream(
                "/grpc.health.v1.Health/Watch",
                request_serializer=request.SerializeToString,
                response_deserializer=response.FromString,
            )
        )


def check_request(
    path: str = "/",
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    host: str = "api.example.com",
    token: str | None = None,
    context_extensions: Mapping[str, str] | None = None,
    remote_addr: str = "203.0.113.7",
) -> pb.CheckRequest:
    """The CheckRequest Envoy sends for `curl -X METHOD -H ... http://HOST/PATH`."""
    all_headers = {":method": method, ":path": path, ":authority": host, **(headers or {})}
    if token is not None:
        all_headers["authorization"] = f"Bearer {token}"
    return pb.CheckRequest(
        attributes=ac.AttributeContext(
            source=ac.AttributeContext.Peer(
                address=address_pb2.Address(
                    socket_address=address_pb2.SocketAddress(address=remote_addr, port_value=51000)
                )
            ),
            request=ac.AttributeContext.Request(
                http=ac.AttributeContext.HttpRequest(
                    id=all_headers.get("x-request-id", "req-1"),
                    method=method,
                    path=path,
                    host=host,
                    scheme="http",
                    protocol="HTTP/1.1",
                    headers=all_headers,
                )
            ),
            context_extensions=dict(context_extensions or {}),
        )
    )


HealthWatch = grpc.aio.UnaryStreamCall[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]


async def watched_status(watch: HealthWatch, timeout: float | None = None) -> int:
    """The next status a health Watch reports (the stubs type a read as `object`: it may be EOF)."""
    reply = await asyncio.wait_for(watch.read(), timeout)
    assert isinstance(reply, health_pb2.HealthCheckResponse), f"the watch ended: {reply!r}"
    return reply.status


@dataclass
class Answer:
    """A CheckResponse, read the way a test wants to read it."""

    response: pb.CheckResponse
    code: int = 0
    http_status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    body: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, response: pb.CheckResponse) -> Answer:
        answer = cls(response, code=response.status.code)
        answer.metadata = {k: v.string_value for k, v in response.dynamic_metadata.fields.items()}
        if response.HasField("ok_response"):
            for option in response.ok_response.headers:
                assert option.HasField("append"), option
                assert option.append.value is False, option
                assert option.header.key not in answer.headers, f"duplicate header {option.header.key}"
                answer.headers[option.header.key] = option.header.value
            answer.removed = list(response.ok_response.headers_to_remove)
        else:
            denied = response.denied_response
            answer.http_status = denied.status.code
            answer.headers = {o.header.key: o.header.value for o in denied.headers}
            answer.body = json.loads(denied.body) if denied.body else {}
        return answer

    @property
    def allowed(self) -> bool:
        return self.code == 0 and self.response.HasField("ok_response")

    def claims(self, header: str = "x-auth-claims") -> dict[str, Any]:
        value = self.headers[header]
        return cast(dict[str, Any], json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))))


class Harness:
    """A started service plus a stub connected to it."""

    def __init__(self, service: AuthzService, channel: grpc.aio.Channel) -> None:
        self.service = service
        self.channel = channel
        self.stub = AuthorizationClient(channel)

    async def check(self, path: str = "/", **kwargs: Any) -> Answer:
        return Answer.of(await self.stub.Check(check_request(path, **kwargs), timeout=10))

    async def close(self) -> None:
        await self.channel.close()
        await self.service.stop(0)


def authentication_only_unless_policies(config: Mapping[str, Any]) -> dict[str, Any]:
    """A test config without policies declares authentication-only mode (every valid token allowed),
    unless it says otherwise: most tests are about tokens, and the mode must be declared."""
    merged = dict(config)
    if not merged.get("policies"):
        merged.setdefault("authentication_only", True)
    return merged


def config_from(data: Mapping[str, Any]) -> Config:
    """A validated Config from a dict (listening on an ephemeral loopback port)."""
    merged = {"server": {"grpc_address": "127.0.0.1:0", "admin_address": None}, **data}
    return parse_config(yaml.safe_dump(authentication_only_unless_policies(merged)))


async def start_harness(config: Config) -> Harness:
    service = AuthzService(config)
    port = await service.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return Harness(service, channel)
