"""CheckRequests shaped like the ones Envoy's ext_authz filter sends, and their gRPC framing."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from google.protobuf.timestamp_pb2 import Timestamp

from authz_service._pb.envoy.config.core.v3 import address_pb2
from authz_service._pb.envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2

CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check"
HOST = "api.example.com"


def _peer(address: str, port: int) -> attribute_context_pb2.AttributeContext.Peer:
    return attribute_context_pb2.AttributeContext.Peer(
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address=address, port_value=port))
    )


def check_request(
    token: str | None,
    method: str = "GET",
    path: str = "/api/Patient/pt-1?_format=json",
    request_id: str = "9f3c1d2e-5b7a-4c8e-a1f0-6d2b3c4e5f60",
) -> external_auth_pb2.CheckRequest:
    """A CheckRequest as Envoy (1.3x+, HTTP/1.1 downstream, headers map) builds it."""
    headers = {
        ":authority": HOST,
        ":path": path,
        ":method": method,
        ":scheme": "http",
        "user-agent": "Mozilla/5.0 (X11; Linux x86_64) bench/1.0",
        "accept": "application/fhir+json, application/json;q=0.9, */*;q=0.8",
        "accept-encoding": "gzip, deflate, br",
        "accept-language": "en-US,en;q=0.9",
        "x-forwarded-proto": "http",
        "x-request-id": request_id,
    }
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    now = Timestamp(seconds=1_760_000_000, nanos=123_456_000)
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        id="12718238491822370651",
        method=method,
        headers=headers,
        path=path,
        host=HOST,
        scheme="http",
        protocol="HTTP/1.1",
    )
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            source=_peer("127.0.0.1", 51234),
            destination=_peer("127.0.0.1", 8080),
            request=attribute_context_pb2.AttributeContext.Request(time=now, http=http),
        )
    )


def frame(message: bytes) -> bytes:
    """gRPC length-prefixed message: 1 byte compressed flag (0), 4 bytes big-endian length, bytes."""
    return struct.pack(">BI", 0, len(message)) + message
