"""HTTP mode (`server.http_address`): the same decisions over plain HTTP/1.1 for Envoy's
http_service (`/ext_authz/<path>`) and for nginx and Traefik (`/forward_auth`), real server, real client."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from authz_service.config.model import Listen
from authz_service.devstack.idp import DevIdentityProvider
from authz_service.errors import ListenError
from authz_service.httpmode import HEADERS_TOO_LARGE, TOKEN_TOO_LARGE, ext_authz_request, forward_auth_request
from authz_service.model import Decision, Reason
from authz_service.server.http import HttpAuthServer, unparsable
from authz_service.server.http_granian import (
    MAX_FIELD,
    GranianHttpServer,
    _ext_authz,
    _forward_auth,
    _oversized,
    _read,
)
from tests.conftest import StartService, jwks_introspector, opaque_introspector
from tests.harness import Harness

POLICIES = [
    {"id": "public", "engine": "matcho", "matcho": {"uri": "#^/public/", "request-method": "get"}},
    {"id": "reports", "engine": "matcho", "matcho": {"uri": "#^/reports/", "jwt": {"sub": "present?"}}},
    {"id": "office", "engine": "matcho", "matcho": {"uri": "/office", "remote-addr": "192.0.2.10"}},
    {
        "id": "writers",
        "engine": "matcho",
        "matcho": {"uri": "/notes", "request-method": "post", "host": "notes.example", "scheme": "https"},
    },
]


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def http_service(
    start_service: StartService, idp: DevIdentityProvider, engine: str, **extra: Any
) -> tuple[Harness, str]:
    config = {
        "server": {
            "grpc_address": "127.0.0.1:0",
            "admin_address": None,
            "http_address": "127.0.0.1:0",
            "http_engine": engine,
        },
        "response": {"claim_headers": {"email": "x-user-email"}},
        "introspectors": [jwks_introspector(idp)],
        "policies": POLICIES,
        **extra,
    }
    harness = await start_service(config)
    assert harness.service.http is not None
    return harness, f"http://127.0.0.1:{harness.service.http.port}"


Served = tuple[Harness, str]  # the service in HTTP mode and its base URL


@pytest.fixture
async def served(idp: DevIdentityProvider, start_service: StartService, http_engine: str) -> Served:
    """The service in HTTP mode on each engine, with this module's policies."""
    return await http_service(start_service, idp, http_engine)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_ext_authz_allow_carries_the_identity_headers(
    idp: DevIdentityProvider, served: Served, client: aiohttp.ClientSession
) -> None:
    _, url = served
    token = idp.mint({"sub": "alice", "email": "alice@example.com"})
    async with client.get(url + "/ext_authz/reports/1?format=pdf", headers=bearer(token)) as response:
        assert response.status == 200
        assert response.headers["x-user-id"] == "alice"
        assert response.headers["x-user-email"] == "alice@example.com"
        assert "x-auth-claims" in response.headers
        assert "x-envoy-auth-headers-to-remove" not in response.headers  # every identity header is set
        assert await response.read() == b""
    no_email = idp.mint({"sub": "bob"})
    async with client.get(url + "/ext_authz/reports/1", headers=bearer(no_email)) as response:
        assert response.status == 200
        assert "x-user-email" not in response.headers
        # A client-sent x-user-email must not survive: Envoy strips what this header lists.
        assert response.headers["x-envoy-auth-headers-to-remove"] == "x-user-email"


async def test_ext_authz_denials_match_the_grpc_answers(
    idp: DevIdentityProvider, served: Served, client: aiohttp.ClientSession
) -> None:
    harness, url = served
    cases = [
        ("/ext_authz/reports/1", {}, 401),
        ("/ext_authz/reports/1", bearer("not.a.token"), 401),
        ("/ext_authz/admin", bearer(idp.mint()), 403),
        ("/ext_authz/reports/1", {"Authorization": f"Bearer {idp.mint()}, Bearer {idp.mint()}"}, 400),
    ]
    for path, headers, status in cases:
        async with client.get(url + path, headers=headers) as response:
            body = await response.json()
            grpc = await harness.check(
                path.removeprefix("/ext_authz"), headers={k.lower(): v for k, v in headers.items()}
            )
            assert response.status == status == grpc.http_status, path
            assert body == grpc.body
            assert response.headers["content-type"] == "application/json"
            assert response.headers.get("www-authenticate") == grpc.headers.get("www-authenticate")


async def test_ext_authz_sees_the_original_method_and_path(served: Served, client: aiohttp.ClientSession) -> None:
    _, url = served
    async with client.get(url + "/ext_authz/public/a?x=1") as response:
        assert response.status == 200  # anonymous GET on /public/ is allowed by a policy
    async with client.post(url + "/ext_authz/public/a") as response:
        assert response.status == 401  # ... a POST is not
    async with client.get(url + "/ext_authz") as response:
        assert response.status == 401  # the root path "/" matches no policy


async def test_idp_down_with_nothing_cached_is_503(
    idp: DevIdentityProvider, start_service: StartService, http_engine: str, client: aiohttp.ClientSession
) -> None:
    await idp.go_offline()
    _, url = await http_service(start_service, idp, http_engine)
    async with client.get(url + "/ext_authz/reports/1", headers=bearer(idp.mint())) as response:
        assert response.status == 503
        assert (await response.json())["error"] == "temporarily_unavailable"


async def test_a_hung_idp_is_503_at_the_introspectors_timeout(
    idp: DevIdentityProvider, start_service: StartService, http_engine: str, client: aiohttp.ClientSession
) -> None:
    # The check's deadline is an asyncio timeout inside the request's task: it must fire on
    # either engine (granian's Rust task implementation, whose task cannot be cancelled, would not).
    _, url = await http_service(start_service, idp, http_engine, introspectors=[opaque_introspector(idp, timeout=0.3)])
    idp.delay = 5
    started = time.monotonic()
    async with client.get(url + "/ext_authz/reports/1", headers=bearer(idp.issue_opaque())) as response:
        assert response.status == 503
        assert (await response.json())["error"] == "temporarily_unavailable"
    assert time.monotonic() - started < 2  # the 0.3 s timeout, not the IdP's 5 s


async def test_forward_auth_reads_the_original_request_from_forwarded_headers(
    idp: DevIdentityProvider, served: Served, client: aiohttp.ClientSession
) -> None:
    _, url = served
    token = idp.mint({"sub": "writer"})
    traefik = {
        "X-Forwarded-Method": "POST",
        "X-Forwarded-Uri": "/notes",
        "X-Forwarded-Host": "notes.example",
        "X-Forwarded-Proto": "https",
        **bearer(token),
    }
    async with client.get(url + "/forward_auth", headers=traefik) as response:
        assert response.status == 200
        assert response.headers["x-user-id"] == "writer"
    nginx = {"X-Original-Method": "POST", "X-Original-URI": "/notes", "X-Forwarded-Proto": "https", **bearer(token)}
    async with client.get(url + "/forward_auth", headers={**nginx, "Host": "notes.example"}) as response:
        assert response.status == 200
    async with client.get(url + "/forward_auth", headers={**nginx, "Host": "other.example"}) as response:
        assert response.status == 403
    async with client.get(url + "/forward_auth", headers={**traefik, "X-Forwarded-Method": "GET"}) as response:
        assert response.status == 403


async def test_forward_auth_without_the_original_uri_is_400(
    idp: DevIdentityProvider, served: Served, client: aiohttp.ClientSession
) -> None:
    _, url = served
    async with client.get(url + "/forward_auth", headers=bearer(idp.mint())) as response:
        assert response.status == 400
        assert (await response.json())["error"] == "invalid_request"


async def test_remote_addr_is_the_last_forwarded_for_entry(
    idp: DevIdentityProvider, served: Served, client: aiohttp.ClientSession
) -> None:
    _, url = served
    token = idp.mint()
    office = {"X-Forwarded-Uri": "/office", **bearer(token)}
    # The proxy appended 192.0.2.10; a client-sent first entry is never read.
    async with client.get(url + "/forward_auth", headers={**office, "X-Forwarded-For": "6.6.6.6, 192.0.2.10"}) as r:
        assert r.status == 200
    async with client.get(url + "/forward_auth", headers={**office, "X-Forwarded-For": "192.0.2.10, 6.6.6.6"}) as r:
        assert r.status == 403


async def test_health_on_the_same_listener(served: Served, client: aiohttp.ClientSession) -> None:
    harness, url = served
    async with client.get(url + "/healthz") as response:
        assert response.status == 200
    async with client.get(url + "/readyz") as response:
        assert response.status == 200
    async with client.get(url + "/elsewhere") as response:
        assert response.status == 404
    harness.service.ready = False  # as while draining
    async with client.get(url + "/readyz") as response:
        assert response.status == 503


async def test_http_checks_are_counted_and_logged_with_their_protocol(
    idp: DevIdentityProvider,
    served: Served,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    harness, url = served
    with caplog.at_level(logging.INFO, logger="authz_service.decision"):
        async with client.get(url + "/ext_authz/reports/1", headers=bearer(idp.mint())) as response:
            assert response.status == 200
        assert (await harness.check("/reports/1", token=idp.mint())).allowed
    registry = harness.service.metrics.registry
    for protocol in ("http", "grpc"):
        labels = {"decision": "allow", "reason": "allowed", "protocol": protocol}
        assert registry.get_sample_value("authz_checks_total", labels) == 1
        assert registry.get_sample_value("authz_check_duration_seconds_count", {"protocol": protocol}) == 1
    lines = [r.__dict__["fields"] for r in caplog.records if r.name == "authz_service.decision"]
    assert [line["protocol"] for line in lines] == ["http", "grpc"]
    assert lines[0]["path"] == "/reports/1"
    assert json.dumps(lines)  # plain data


async def test_an_unexpected_error_is_503_and_the_listener_keeps_serving(
    idp: DevIdentityProvider, served: Served, client: aiohttp.ClientSession
) -> None:
    harness, url = served
    engine = harness.service.engine
    broken = engine.http_answers

    class Exploding:
        def answer(self, decision: Any) -> Any:
            if decision.outcome.value == "allow":
                raise RuntimeError("bug")
            return broken.answer(decision)

    harness.service.engine = dataclasses.replace(engine, http_answers=Exploding())  # type: ignore[arg-type]
    async with client.get(url + "/ext_authz/reports/1", headers=bearer(idp.mint())) as response:
        assert response.status == 503
        assert (await response.json())["error_description"] == "internal error"
    harness.service.engine = engine
    async with client.get(url + "/ext_authz/reports/1", headers=bearer(idp.mint())) as response:
        assert response.status == 200


async def test_a_request_as_traefik_sends_it(
    idp: DevIdentityProvider, served: Served, client: aiohttp.ClientSession
) -> None:
    """Traefik's forwardAuth (trustForwardHeader: false), as its documentation describes the request:
    GET to the address, the client's headers, and X-Forwarded-Method/-Proto/-Host/-Uri/-For set by
    Traefik. Traefik itself cannot be installed here; deploy/traefik/dynamic.yaml is checked
    structurally in tests/unit/test_deploy_http.py."""
    _, url = served
    token = idp.mint({"sub": "writer", "email": "w@example.com"})
    recorded = {
        "User-Agent": "curl/8.5.0",
        "Accept": "*/*",
        "Authorization": f"Bearer {token}",
        "X-User-Id": "mallory",  # client-sent: Traefik replaces it with our answer's (authResponseHeaders)
        "X-Forwarded-Method": "POST",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "notes.example",
        "X-Forwarded-Uri": "/notes",
        "X-Forwarded-For": "198.51.100.23",
        "Accept-Encoding": "gzip",
    }
    async with client.get(url + "/forward_auth", headers=recorded) as response:
        assert response.status == 200
        answer = dict(response.headers)
    # What Traefik then does with authResponseHeaders [X-User-Id, X-Auth-Claims, X-User-Email]:
    # delete each from the request, then copy it from the answer when the answer has it.
    forwarded = {k.lower(): v for k, v in recorded.items()}
    for name in ("x-user-id", "x-auth-claims", "x-user-email"):
        forwarded.pop(name, None)
        if name in {k.lower() for k in answer}:
            forwarded[name] = next(v for k, v in answer.items() if k.lower() == name)
    assert forwarded["x-user-id"] == "writer"
    assert forwarded["x-user-email"] == "w@example.com"
    denied = {k: v for k, v in recorded.items() if k != "Authorization"} | {"X-Forwarded-Uri": "/reports/1"}
    async with client.get(url + "/forward_auth", headers=denied) as response:
        # Traefik returns a non-2xx answer to the client as it is.
        assert response.status == 401
        assert response.headers["www-authenticate"] == 'Bearer realm="authz-service"'
        assert (await response.json())["error"] == "unauthorized"


async def test_sigterm_drain_keeps_answering_http_checks_then_closes(
    idp: DevIdentityProvider, served: Served, client: aiohttp.ClientSession
) -> None:
    harness, url = served
    token = idp.mint()
    stopping = asyncio.ensure_future(harness.service.stop(grace=1, drain_delay=0.6))
    await asyncio.sleep(0)  # one turn of the loop: stop() turns unready before its first await
    assert not harness.service.ready
    async with client.get(url + "/readyz") as response:
        assert response.status == 503  # Envoy's health check moves checks away ...
    async with client.get(url + "/ext_authz/reports/1", headers=bearer(token)) as response:
        assert response.status == 200  # ... while checks already on their way are still answered
    await stopping
    with pytest.raises(aiohttp.ClientConnectionError):
        async with client.get(url + "/healthz", headers={"Connection": "close"}):
            pass


async def test_stop_lets_a_check_in_flight_finish_within_the_grace(
    idp: DevIdentityProvider, start_service: StartService, http_engine: str, client: aiohttp.ClientSession
) -> None:
    harness, url = await http_service(start_service, idp, http_engine, introspectors=[opaque_introspector(idp)])
    assert harness.service.http is not None
    arrived, release = asyncio.Event(), asyncio.Event()

    async def held() -> None:  # the IdP's answer to an introspection waits for the test
        arrived.set()
        await release.wait()

    idp._wait = held  # type: ignore[method-assign]
    token = idp.issue_opaque()

    async def ask() -> int:
        async with client.get(url + "/ext_authz/public/1", headers=bearer(token)) as response:
            return response.status

    order: list[str] = []
    check = asyncio.ensure_future(ask())
    check.add_done_callback(lambda _: order.append("answered"))
    await arrived.wait()  # the check is in flight, waiting for its introspection
    assert harness.service.http.runner.in_flight == 1
    stopping = asyncio.ensure_future(harness.service.http.stop())  # shutdown_grace: 10 s
    stopping.add_done_callback(lambda _: order.append("stopped"))
    release.set()  # after stop() began: the ready queue runs it first
    assert await check == 200
    await stopping
    assert order == ["answered", "stopped"]
    assert harness.service.http.runner.in_flight == 0
    with pytest.raises(aiohttp.ClientConnectionError):
        async with client.get(url + "/healthz", headers={"Connection": "close"}):
            pass


async def test_workers_share_the_http_port_and_a_taken_one_is_named(
    idp: DevIdentityProvider, start_service: StartService, http_engine: str, client: aiohttp.ClientSession
) -> None:
    harness, _ = await http_service(start_service, idp, http_engine)
    service = harness.service
    assert service.http is not None
    engine_server = type(service.http)
    assert engine_server.__name__ == {"granian": "GranianHttpServer", "aiohttp": "HttpAuthServer"}[http_engine]

    def listener(port: int, reuse_port: bool) -> HttpAuthServer | GranianHttpServer:
        return engine_server(
            Listen("127.0.0.1", port),
            service.current_engine,
            service.metrics,
            lambda: True,
            log_decision=service.decisions.log_decision,
            log_internal_error=service.decisions.log_internal_error,
            reuse_port=reuse_port,
        )

    first = listener(0, reuse_port=True)
    port = await first.start()
    second = listener(port, reuse_port=True)  # a supervisor's workers: SO_REUSEPORT
    try:
        assert await second.start() == port
        with pytest.raises(ListenError) as taken:
            await listener(port, reuse_port=False).start()
        assert taken.value.address == f"127.0.0.1:{port}"
        for _ in range(4):
            async with client.get(f"http://127.0.0.1:{port}/ext_authz/reports/1", headers=bearer(idp.mint())) as r:
                assert r.status == 200
    finally:
        await second.stop()
        await first.stop()


def test_what_aiohttp_could_not_parse_is_judged_from_either_of_its_parsers() -> None:
    # Its C parser quotes the start of the value that was too long, its Python parser the header line.
    assert unparsable(LineTooLong(b"Bearer eyJ" + b"A" * 90 + b"...", 8190)).reason is Reason.TOO_LARGE
    assert unparsable(LineTooLong(b"bearer eyJ...", 8190)).reason is Reason.TOO_LARGE
    assert unparsable(LineTooLong(b"Authorization: Bearer eyJ...", 8190)).reason is Reason.TOO_LARGE
    assert unparsable(LineTooLong(b"Cookie: sid=...", 8190)).reason is Reason.HEADERS_TOO_LARGE
    assert unparsable(LineTooLong(b"/ext_authz/ppp...", 8190)).reason is Reason.HEADERS_TOO_LARGE  # the URL
    assert unparsable(BadHttpMessage("Too many headers received")).reason is Reason.HEADERS_TOO_LARGE
    assert unparsable(BadHttpMessage("Invalid HTTP header: 'Bad Header'")).reason is Reason.UNDECODABLE_REQUEST


async def test_a_header_value_that_is_not_utf8_is_read_as_aiohttp_reads_it(
    idp: DevIdentityProvider, served: Served
) -> None:
    harness, _ = served
    assert harness.service.http is not None
    assert harness.service.http.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", harness.service.http.port)
    head = f"GET /ext_authz/reports/1 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {idp.mint()}\r\n"
    writer.write(head.encode() + b"X-Name: caf\xe9\r\nConnection: close\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ")


def test_granian_refuses_a_field_over_aiohttps_limit_as_aiohttp_does() -> None:
    at_limit = b"x" * MAX_FIELD
    assert _oversized(b"/ext_authz/" + at_limit[11:], [(b"x-a", at_limit)]) is None
    assert _oversized(b"/ext_authz/x", [(b"x-a", b"v"), (b"authorization", b"Bearer " + at_limit)]) == TOKEN_TOO_LARGE
    assert _oversized(b"/ext_authz/x", [(b"cookie", at_limit + b"x")]) == HEADERS_TOO_LARGE
    assert _oversized(b"/ext_authz/" + at_limit, []) == HEADERS_TOO_LARGE


_TRAEFIK = [
    (b"host", b"authz:8080"),
    (b"x-forwarded-method", b"GET"),
    (b"x-forwarded-uri", b"/fhir/Patient/1?x=1"),
    (b"x-forwarded-host", b"api.example.com"),
    (b"x-forwarded-for", b"10.0.0.1"),
    (b"authorization", b"Bearer abc"),
]


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(_TRAEFIK, id="plain"),
        pytest.param([*_TRAEFIK, (b"cookie", b"a=1"), (b"cookie", b"b=2")], id="a-repeated-header"),
        pytest.param([*_TRAEFIK, (b"x-forwarded-uri", b"/public")], id="a-repeated-original"),
        pytest.param([*_TRAEFIK, (b"x-name", "José".encode("latin-1"))], id="a-value-not-utf8"),
        pytest.param(
            [*_TRAEFIK, (b"cookie", b"a=1"), (b"cookie", b"x" * (MAX_FIELD + 1))], id="too-large-after-a-repeat"
        ),
        pytest.param([(b"authorization", b"Bearer " + b"x" * MAX_FIELD), *_TRAEFIK], id="too-large-first"),
        pytest.param([], id="none"),
    ],
)
def test_granians_one_pass_header_reading_judges_as_the_pairs_do(headers: list[tuple[bytes, bytes]]) -> None:
    # granian's shell reads headers into the adapters' dict in one pass, and falls back to the
    # pairs (as aiohttp hands them over) on a repeat or a value that is not UTF-8: both ways must
    # give the same request, or the same refusal.
    for path, fast, general in (
        (b"/forward_auth", _forward_auth, forward_auth_request),
        (b"/ext_authz/fhir/Patient/1", _ext_authz, ext_authz_request),
    ):
        scope = {"raw_path": path, "query_string": b"", "headers": headers, "method": "GET", "client": ("10.9.9.9", 1)}
        target = path.decode()
        read = _read(scope, path, target)
        refused = _oversized(path, headers)
        if refused is not None:
            assert read == refused
            continue
        assert not isinstance(read, Decision)
        pairs = [(name.decode("latin-1"), value.decode("utf-8", "surrogateescape")) for name, value in headers]
        assert fast(read) == general("GET", target, pairs, "10.9.9.9")
