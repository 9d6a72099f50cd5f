"""The checks the benchmark sends: CheckRequests shaped like the ones Envoy's ext_authz filter
sends (and their gRPC framing), and the same request as HTTP mode receives it from nginx or
Traefik (`/forward_auth`) and from Envoy's http_service (`/ext_authz/<path>`)."""

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


PATH = "/api/Patient/pt-1?_format=json"
REQUEST_ID = "9f3c1d2e-5b7a-4c8e-a1f0-6d2b3c4e5f60"
# What a browser-like client sends besides the token; the same in every protocol.
CLIENT_HEADERS = {
    "user-agent": "Mozilla/5.0 (X11; Linux x86_64) bench/1.0",
    "accept": "application/fhir+json, application/json;q=0.9, */*;q=0.8",
    "accept-encoding": "gzip, deflate, br",
    "accept-language": "en-US,en;q=0.9",
}


def http_check_headers(token: str | None, mode: str, request_id: str = REQUEST_ID) -> list[str]:
    """The headers of an HTTP-mode check of `GET PATH`, as `name: value` lines (h2load -H).

    mode "forward_auth": what Traefik's forwardAuth sends (the original request in X-Forwarded-*,
    the client's headers as they came); "ext_authz": what Envoy's http_service sends to
    /ext_authz/<path> (the original headers, plus X-Forwarded-Proto and the X-Forwarded-For
    entry Envoy appends). The host travels as h2load's Host header (the URL's), so it is not here.
    """
    headers = {**CLIENT_HEADERS, "x-request-id": request_id, "x-forwarded-proto": "http"}
    if mode == "forward_auth":
        headers.update(
            {
                "x-forwarded-method": "GET",
                "x-forwarded-uri": PATH,
                "x-forwarded-host": HOST,
                "x-forwarded-for": "127.0.0.1",
            }
        )
    elif mode == "ext_authz":
        headers["x-forwarded-for"] = "127.0.0.1"
    else:
        raise ValueError(f"unknown HTTP check mode {mode!r}")
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    return [f"{name}: {value}" for name, value in headers.items()]


def http_check_path(mode: str) -> str:
    """The path an HTTP-mode check of `GET PATH` is sent to."""
    return "/forward_auth" if mode == "forward_auth" else "/ext_authz" + PATH


def check_request(
    token: str | None,
    method: str = "GET",
    path: str = PATH,
    request_id: str = REQUEST_ID,
    stream_id: str = "12718238491822370651",
) -> external_auth_pb2.CheckRequest:
    """A CheckRequest as Envoy (1.3x+, HTTP/1.1 downstream, headers map) builds it.

    stream_id is `attributes.request.http.id` (Envoy's stream id), which the service logs as the
    decision's request_id; request_id is the x-request-id header."""
    headers = {
        ":authority": HOST,
        ":path": path,
        ":method": method,
        ":scheme": "http",
        **CLIENT_HEADERS,
        "x-forwarded-proto": "http",
        "x-request-id": request_id,
    }
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    now = Timestamp(seconds=1_760_000_000, nanos=123_456_000)
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        id=stream_id,
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
