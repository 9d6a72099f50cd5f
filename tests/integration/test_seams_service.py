"""Security at the seams, through the real servers: the request a policy judges is the request the
upstream gets (gRPC Check, HTTP mode's `/ext_authz/<path>` and `/forward_auth` alike).

HTTP-mode requests are written byte for byte on a socket (`curl --path-as-is`): an HTTP client
would resolve `..` itself, and could not send an oversized header.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from authz_service.config.model import DEFAULT_HTTP_ENGINE
from authz_service.devstack.idp import DevIdentityProvider
from tests.conftest import StartService, jwks_introspector
from tests.harness import Harness
from tests.unit.test_routes import OWN_PATIENT

POLICIES = [
    {"id": "public", "engine": "matcho", "matcho": {"uri": "#^/public/", "request-method": "get"}},
    {"id": "admin-x", "engine": "matcho", "matcho": {"uri": "/admin/x", "jwt": {"sub": "present?"}}},
    # Aidbox's own-patient policy, verbatim: `params.resource/id` is constrained only when present.
    json.loads(OWN_PATIENT),
]


@dataclass
class Reply:
    """An answer, from either protocol: the status, the deny body and the headers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str]


async def start(
    start_service: StartService, idp: DevIdentityProvider, engine: str = DEFAULT_HTTP_ENGINE
) -> tuple[Harness, int]:
    harness = await start_service(
        {
            "server": {
                "grpc_address": "127.0.0.1:0",
                "admin_address": None,
                "http_address": "127.0.0.1:0",
                "http_engine": engine,
            },
            "introspectors": [jwks_introspector(idp, from_params=["access_token"])],
            "policies": POLICIES,
        }
    )
    assert harness.service.http is not None
    assert harness.service.http.port is not None
    return harness, harness.service.http.port


async def raw_http(port: int, request_line: str, headers: Mapping[str, str] | None = None) -> Reply:
    """Send exactly `request_line` and `headers` (and Connection: close); read the whole answer."""
    lines = [request_line, "Host: authz.local", *(f"{name}: {value}" for name, value in (headers or {}).items())]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(("\r\n".join([*lines, "Connection: close", "", ""])).encode("latin-1"))
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    answer_headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    return Reply(int(status_line.split()[1]), json.loads(body) if body else {}, answer_headers)


async def grpc(harness: Harness, path: str, method: str = "GET", token: str | None = None) -> Reply:
    answer = await harness.check(path, method=method, token=token)
    return Reply(answer.http_status, answer.body, answer.headers)


async def ext_authz(port: int, path: str, method: str = "GET", token: str | None = None) -> Reply:
    # Envoy's http_service with path_prefix /ext_authz: the original method, path and headers.
    return await raw_http(port, f"{method} /ext_authz{path} HTTP/1.1", bearer(token))


async def forward_auth(port: int, path: str, method: str = "GET", token: str | None = None) -> Reply:
    # Traefik's forwardAuth: a GET describing the original request in X-Forwarded-*.
    headers = {"X-Forwarded-Method": method, "X-Forwarded-Uri": path, **bearer(token)}
    return await raw_http(port, "GET /forward_auth HTTP/1.1", headers)


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token is not None else {}


AMBIGUOUS = {"error": "invalid_request", "error_description": "the request path can be read more than one way"}
NOT_A_ROUTE = {"error": "invalid_request", "error_description": "the path looks like a FHIR route but is none"}
AMBIGUOUS_QUERY = {
    "error": "invalid_request",
    "error_description": "a query parameter name can be read more than one way",
}


async def test_every_transport_judges_the_path_the_upstream_routes(
    idp: DevIdentityProvider, start_service: StartService, http_engine: str
) -> None:
    harness, port = await start(start_service, idp, http_engine)
    token = idp.mint({"sub": "alice"})

    async def ask(path: str, method: str = "GET", token: str | None = None) -> list[Reply]:
        return [
            await grpc(harness, path, method, token),
            await ext_authz(port, path, method, token),
            await forward_auth(port, path, method, token),
        ]

    # `/public/../admin/x` is `/admin/x` to the upstream: not public, but admin-x's.
    for reply in await ask("/public/../admin/x"):
        assert reply.status == 401
    for reply in await ask("/public/../admin/x", token=token):
        assert reply.status == 200
    assert (await harness.check("/public/../admin/x", token=token)).metadata["policy"] == "admin-x"
    for path in ("/public/./a", "/public/a//b", "/public/a/b/.."):
        for reply in await ask(path):
            assert reply.status == 200, path  # `/public/a`, `/public/a/b`, `/public/a/`
    # Read two ways: refused before any token is looked at, with the JSON body of every denial.
    for path in (
        "/public/%2e%2e/admin/x",
        "/public/..%2fadmin/x",
        "/public/x;/../../admin/x",
        "/../admin/x",
        "/public//../admin/x",
    ):
        for reply in await ask(path, token=token):
            assert (reply.status, reply.body) == (400, AMBIGUOUS), path
            assert reply.headers["www-authenticate"].startswith('Bearer realm="authz-service", error="invalid_request"')
    # An absolute-form URI names a host (nginx's $request_uri passes it on as sent).
    assert (await forward_auth(port, "http://evil.example/admin/x", token=token)).status == 400
    assert (await grpc(harness, "http://evil.example/public/x")).status == 400


async def test_the_decision_log_writes_the_path_the_policies_judged(
    idp: DevIdentityProvider, start_service: StartService, caplog: pytest.LogCaptureFixture
) -> None:
    harness, port = await start(start_service, idp)
    caplog.set_level(logging.INFO, "authz_service.decision")
    await grpc(harness, "/public/../admin/x?q=1")
    await forward_auth(port, "/public/a//b/c")
    paths = [record.fields["path"] for record in caplog.records if hasattr(record, "fields")]
    assert paths == ["/admin/x", "/public/a/b/c"]


async def test_a_fhir_shaped_path_that_is_no_route_is_refused_before_policies(
    idp: DevIdentityProvider, start_service: StartService
) -> None:
    harness, port = await start(start_service, idp)
    mine = idp.mint({"sub": "patient-1", "pid": "pt-1"})
    for path, method in [
        ("/fhir/Patient/pt-2;x=1", "GET"),
        ("/fhir/Patient/pt-2", "POST"),
        ("/fhir/Patient/pt-2", "OPTIONS"),
    ]:
        for reply in (
            await grpc(harness, path, method, mine),
            await ext_authz(port, path, method, mine),
            await forward_auth(port, path, method, mine),
        ):
            assert (reply.status, reply.body) == (400, NOT_A_ROUTE), (method, path)
    assert (await grpc(harness, "/fhir/Patient/pt-1", token=mine)).status == 200
    assert (await grpc(harness, "/fhir/Patient/pt-2", token=mine)).status == 403
    assert (await ext_authz(port, "/fhir/Patient/pt-1", token=mine)).status == 200


async def test_forward_auth_refuses_original_headers_that_disagree(
    idp: DevIdentityProvider, start_service: StartService, http_engine: str
) -> None:
    _, port = await start(start_service, idp, http_engine)
    token = idp.mint()
    conflicting = {"error": "invalid_request", "error_description": "the proxy's original-request headers disagree"}

    async def forward(*headers: tuple[str, str]) -> Reply:
        request = "\r\n".join(["GET /forward_auth HTTP/1.1", *(f"{name}: {value}" for name, value in headers)])
        return await raw_http(port, request, bearer(token))

    # Traefik's X-Forwarded-Uri says /public/x, a client's X-Original-URI /admin/x: which did nginx set?
    for headers in [
        (("X-Forwarded-Uri", "/public/x"), ("X-Original-URI", "/admin/x")),
        (("X-Forwarded-Uri", "/public/x"), ("X-Original-URI", "/public/x?a=1")),
        (("X-Forwarded-Uri", "/public/x"), ("X-Forwarded-Method", "GET"), ("X-Original-Method", "DELETE")),
        (("X-Original-URI", "/public/x"), ("X-Forwarded-Method", "POST"), ("X-Original-Method", "GET")),
        # Repeated: the proxy's value and a client's own.
        (("X-Forwarded-Uri", "/public/x"), ("X-Forwarded-Uri", "/admin/x")),
        (("X-Original-URI", "/public/x"), ("X-Original-Method", "GET"), ("X-Original-Method", "GET")),
    ]:
        reply = await forward(*headers)
        assert (reply.status, reply.body) == (400, conflicting), headers
        assert reply.headers["x-authz-error"] == "invalid_request"
    # Both present and agreeing (methods in any case) is what a proxy chain may well send.
    agreeing = (
        ("X-Forwarded-Uri", "/public/x"),
        ("X-Original-URI", "/public/x"),
        ("X-Forwarded-Method", "GET"),
        ("X-Original-Method", "get"),
    )
    assert (await forward(*agreeing)).status == 200
    assert (await forward(("X-Original-URI", "/public/x"), ("X-Forwarded-Method", "GET"))).status == 200
    assert (await forward(("X-Original-URI", "/public/x"), ("X-Original-Method", "POST"))).status == 403


async def test_a_header_over_the_size_limit_is_answered_as_every_denial(
    idp: DevIdentityProvider, start_service: StartService, http_engine: str, caplog: pytest.LogCaptureFixture
) -> None:
    harness, port = await start(start_service, idp, http_engine)
    big_token = "eyJ" + "A" * 9000  # past aiohttp's 8,190-byte field limit
    with caplog.at_level(logging.DEBUG):
        token_reply = await raw_http(port, "GET /ext_authz/public/x HTTP/1.1", {"Authorization": f"Bearer {big_token}"})
        header_reply = await raw_http(port, "GET /ext_authz/public/x HTTP/1.1", {"X-Big": "b" * 9000})
        many_reply = await raw_http(port, "GET /forward_auth HTTP/1.1", {f"X-H{i}": "v" for i in range(200)})
        url_reply = await raw_http(port, "GET /ext_authz/public/" + "p" * 9000 + " HTTP/1.1")
        broken_reply = await raw_http(port, "GET /ext_authz/public/x HTTP/1.1", {"Bad Header": "x"})
    # An oversized token is judged as Check judges one: 401 too_large.
    assert token_reply.status == 401
    assert token_reply.body == {"error": "invalid_token", "error_description": "token too large"}
    assert token_reply.headers["www-authenticate"].startswith('Bearer realm="authz-service", error="invalid_token"')
    # Any other oversized header (or too many, or an oversized path, as Envoy counts it): 431.
    too_large = {"error": "invalid_request", "error_description": "request headers too large"}
    # granian refuses more than 100 header fields, and a request it cannot parse, itself: its own
    # empty 431 or 400, before any check (not counted); aiohttp's parser errors reach our answer.
    ours = (header_reply, url_reply) if http_engine == "granian" else (header_reply, many_reply, url_reply)
    for reply in ours:
        assert (reply.status, reply.body) == (431, too_large)
        assert reply.headers["content-type"] == "application/json"
        assert reply.headers["x-authz-error-description"] == "request headers too large"
    assert many_reply.status == 431
    # Anything else the parser refuses: 400 (aiohttp's: the same JSON).
    assert broken_reply.status == 400
    if http_engine == "aiohttp":
        assert broken_reply.body["error"] == "invalid_request"
    # Never the token, in the answer or a log line (aiohttp's own answer and log quote it).
    logged = caplog.text  # formatted: messages and tracebacks
    assert "AAAAAAAAAA" not in logged
    assert "bbbbbbbbbb" not in logged
    # Counted as every denial.
    registry = harness.service.metrics.registry
    labels = {"decision": "invalid_request", "reason": "headers_too_large", "protocol": "http"}
    assert registry.get_sample_value("authz_checks_total", labels) == len(ours)
    labels = {"decision": "unauthenticated", "reason": "too_large", "protocol": "http"}
    assert registry.get_sample_value("authz_checks_total", labels) == 1
    # The listener keeps serving.
    assert (await ext_authz(port, "/public/x")).status == 200


async def test_a_query_token_counts_under_its_exact_name_and_is_removed(
    idp: DevIdentityProvider, start_service: StartService, http_engine: str
) -> None:
    harness, port = await start(start_service, idp, http_engine)
    token = idp.mint({"sub": "alice"})
    allowed = await harness.check(f"/admin/x?access_token={token}")
    assert allowed.allowed
    assert list(allowed.response.ok_response.query_parameters_to_remove) == ["access_token"]
    # Envoy removes `access_token` by that exact name: `access%5Ftoken` would reach the upstream,
    # which may decode it into `access_token`. Refused, whatever carries the request's own token.
    for query in (f"access%5Ftoken={token}", f"Access_Token={token}", f"x=1;access_token={token}"):
        for reply in (
            await grpc(harness, f"/admin/x?{query}"),
            await grpc(harness, f"/admin/x?{query}", token=token),
            await ext_authz(port, f"/admin/x?{query}", token=token),
        ):
            assert (reply.status, reply.body) == (400, AMBIGUOUS_QUERY), query
