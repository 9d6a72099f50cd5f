"""The attack table: requests that reached protected paths, or carried their own identity, through
the shipped proxy configs. Each runs through the REAL nginx (deploy/nginx/nginx.conf) and the REAL
Envoy (envoy/envoy.yaml over gRPC, envoy/envoy-http.yaml over HTTP) in front of the service (a
subprocess) and the echo upstream.

The proxy configs are `authz-service proxy-config <proxy>` for this module's service config, with
only their ports replaced: for examples/demo.yaml that output is the shipped file byte for byte
(tests/unit/test_proxyconfig.py), and this config's `x-user-role` is exactly what a user with a
`claim_headers` entry of their own must regenerate for (docs/proxies.md).

The policy set: anonymous `GET #^/public/`; any token anywhere but /admin; and a deliberately naive
policy that trusts an `x-user-role: admin` header on /by-role/ (only the service may set that header:
`claim_headers: {role: x-user-role}`). Without a token nothing but GET /public/... may reach the
upstream, and no request reaches it (or the policies) with an identity header the client wrote.

Requests go out on raw sockets: aiohttp (like curl without --path-as-is) would resolve `..` itself.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yaml

from authz_service import proxyconfig
from authz_service.devstack.echo import EchoUpstream
from authz_service.devstack.envoy import Envoy, StartError, on_loopback
from authz_service.devstack.idp import DevIdentityProvider
from authz_service.registries import parse_config
from tests.conftest import free_port, jwks_introspector, new_idp, run_service, tail, wait_serving
from tests.e2e.conftest import START_TIMEOUT, stop_process, wait_until
from tests.e2e.test_proxies import nginx_config, run_nginx

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

HOST = "127.0.0.1"
PROXIES = ["nginx", "envoy-http", "envoy-grpc"]
IDENTITY = ("x-user-id", "x-auth-claims", "x-user-role")
FORGED_CLAIMS = base64.urlsafe_b64encode(json.dumps({"sub": "admin", "role": "admin"}).encode()).decode().rstrip("=")
POLICIES = [
    {"id": "public", "engine": "matcho", "matcho": {"uri": "#^/public/", "request-method": "get"}},
    {"id": "signed-in", "engine": "matcho", "matcho": {"uri": {"$not": "#^/admin(/|$)"}, "introspector": "present?"}},
    # Naive on purpose: safe only because no client-sent x-user-role ever reaches a policy.
    {"id": "by-role-header", "engine": "matcho", "matcho": {"uri": "#^/by-role/", "headers": {"x-user-role": "admin"}}},
]


@dataclass(frozen=True)
class Answer:
    """A raw HTTP answer: status, headers (lower-case names, repeats kept), body."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]


async def send(
    port: int, target: str, method: str = "GET", headers: tuple[tuple[str, str], ...] = (), timeout: float = 10
) -> Answer:
    """One HTTP/1.1 request with the target exactly as given (no client-side normalization)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {HOST}:{port}", "Connection: close"]
        if method in ("POST", "PUT"):
            lines.append("Content-Length: 0")
        lines += [f"{name}: {value}" for name, value in headers]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = []
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed.append((name.strip().lower(), value.strip()))
    return Answer(int(status_line.split()[1]), parsed, body)


@dataclass
class Stack:
    """One proxy in front of the shared service and echo upstream."""

    proxy: str
    port: int
    echo: EchoUpstream
    access_log: Path
    idp: DevIdentityProvider
    cleanups: list[Any] = field(default_factory=list)


@dataclass
class Service:
    process: asyncio.subprocess.Process
    grpc_port: int
    http_port: int
    log: Path
    config_text: str  # the service config, for `proxy-config`


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def idp_m() -> AsyncIterator[DevIdentityProvider]:
    async with await new_idp() as provider:
        yield provider


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def echo_m() -> AsyncIterator[EchoUpstream]:
    async with EchoUpstream() as upstream:
        yield upstream


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def session_m() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        yield client


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def service_m(
    idp_m: DevIdentityProvider, tmp_path_factory: pytest.TempPathFactory, session_m: aiohttp.ClientSession
) -> AsyncIterator[Service]:
    """The service with both listeners: gRPC for envoy.yaml, HTTP for envoy-http.yaml and nginx."""
    workdir = tmp_path_factory.mktemp("seams-service")
    grpc_port, http_port = free_port(), free_port()
    config = {
        "server": {
            "grpc_address": f"{HOST}:{grpc_port}",
            "http_address": f"{HOST}:{http_port}",
            "admin_address": None,
            "drain_delay": 0,
        },
        "response": {"claim_headers": {"role": "x-user-role"}},
        "introspectors": [jwks_introspector(idp_m, from_params=["access_token"])],
        "policies": POLICIES,
    }
    path = workdir / "authz.yaml"
    text = yaml.safe_dump(config)
    path.write_text(text)
    log = workdir / "authz.log"
    process = await run_service(path, log)
    try:
        await wait_serving(grpc_port, process, START_TIMEOUT, log)
        yield Service(process, grpc_port, http_port, log, text)
    finally:
        await stop_process(process)


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=PROXIES)
async def stack(
    request: pytest.FixtureRequest,
    service_m: Service,
    echo_m: EchoUpstream,
    idp_m: DevIdentityProvider,
    session_m: aiohttp.ClientSession,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Stack]:
    """The proxy under test, started once per module and proxy."""
    proxy: str = request.param
    workdir = tmp_path_factory.mktemp(f"seams-{proxy}")
    listener = free_port()
    generated = proxyconfig.render(proxy, parse_config(service_m.config_text))
    if proxy == "nginx":
        config = nginx_config(listener, service_m.http_port, echo_m.port, generated)
        async with run_nginx(config, listener, workdir, session_m):
            yield Stack(proxy, listener, echo_m, workdir / "access.log", idp_m)
        return
    cluster, port = ("authz_http", service_m.http_port) if proxy == "envoy-http" else ("authz", service_m.grpc_port)
    envoy_config = on_loopback(
        yaml.safe_load(generated),
        listener=listener,
        admin=free_port(),
        clusters={cluster: port, "upstream": echo_m.port},
    )
    envoy = Envoy.start(envoy_config, workdir)
    try:
        try:
            await envoy.wait_ready(session_m, {cluster: 1}, START_TIMEOUT)
        except StartError as err:
            pytest.fail(f"{err}:\n{envoy.child.tail(30)}\n{tail(service_m.log)}")
        yield Stack(proxy, listener, echo_m, envoy.access_log, idp_m)
    finally:
        await envoy.stop()


@pytest.fixture
def fresh(stack: Stack) -> Stack:
    """The stack with the echo's request log emptied: each case sees only its own requests."""
    stack.echo.requests.clear()
    return stack


def upstream_paths(stack: Stack) -> list[str]:
    return [request["path"] for request in stack.echo.requests]


def assert_nothing_protected_reached_the_upstream(stack: Stack) -> None:
    """Whatever got through without a token is a GET of a /public/ path with nothing left to resolve."""
    for request in stack.echo.requests:
        path = request["path"].partition("?")[0]
        lowered = path.lower()
        assert request["method"] == "GET", request
        assert path.startswith("/public/"), request
        assert ".." not in path.split("/"), request
        for left in ("\\", "%2e", "%2f", "%5c"):  # nothing the application could still decode or resolve
            assert left not in lowered, request


def assert_no_client_identity(stack: Stack, forged: tuple[str, ...]) -> None:
    """No identity header (in any spelling) carries a value the client wrote."""
    for request in stack.echo.requests:
        for name, value in request["headers"]:
            if name.replace("_", "-") in IDENTITY:
                assert value not in forged, (name, value, request)


# Each: (id, method, target, headers, refused). `refused`: a request whose only reading is a
# protected path: 400 or 401, nothing upstream. Otherwise it may pass, but only as a /public/ GET.
# `{authority}` is the proxy's own host:port (absolute-form request targets).
ATTACKS: list[tuple[str, str, str, tuple[tuple[str, str], ...], bool]] = [
    ("forged-x-forwarded-uri", "GET", "/admin/x", (("X-Forwarded-Uri", "/public/x"),), True),
    ("forged-x-original-uri", "GET", "/admin/x", (("X-Original-URI", "/public/x"),), True),
    (
        "forged-both-uri-headers",
        "GET",
        "/admin/x",
        (("X-Forwarded-Uri", "/public/x"), ("X-Original-URI", "/public/x")),
        True,
    ),
    (
        "forged-method",
        "POST",
        "/public/x",
        (("X-Forwarded-Method", "GET"), ("X-Original-Method", "GET")),
        True,
    ),
    ("dot-segments", "GET", "/public/../admin/x", (), True),
    ("encoded-dot-segments", "GET", "/public/%2e%2e/admin/x", (), True),
    ("encoded-dot-segments-upper", "GET", "/public/%2E%2E/admin/x", (), True),
    ("encoded-slash", "GET", "/public/..%2fadmin/x", (), True),
    ("encoded-slash-upper", "GET", "/public/..%2Fadmin/x", (), True),
    ("encoded-backslash", "GET", "/public/..%5cadmin/x", (), True),
    ("backslash", "GET", "/public/..\\admin/x", (), True),
    ("semicolon-then-dots", "GET", "/public/x;/../../admin/x", (), True),
    ("absolute-form", "GET", "http://{authority}/public/../admin/x", (), True),
    ("absolute-form-other-host", "GET", "http://public.example/public/../admin/x", (), True),
    ("nul", "GET", "/public/%00/../../admin/x", (), True),
    ("double-encoded-dots", "GET", "/public/%252e%252e/admin/x", (), False),
    ("empty-segment-then-dots", "GET", "/public//../admin/x", (), False),
    ("forged-host", "GET", "/admin/x", (("X-Forwarded-Host", "public.example"),), True),
]


@pytest.mark.parametrize(
    ("method", "target", "headers", "refused"), [a[1:] for a in ATTACKS], ids=[a[0] for a in ATTACKS]
)
async def test_no_token_never_reaches_a_protected_path(
    fresh: Stack, method: str, target: str, headers: tuple[tuple[str, str], ...], refused: bool
) -> None:
    answer = await send(fresh.port, target.format(authority=f"{HOST}:{fresh.port}"), method, headers)
    assert_nothing_protected_reached_the_upstream(fresh)
    assert len(answer.header("www-authenticate")) <= 1, answer.headers
    if refused:
        assert answer.status in (400, 401), (answer.status, upstream_paths(fresh))
        assert fresh.echo.requests == []


async def test_the_public_path_still_works(fresh: Stack) -> None:
    """The control: the table above fails for the right reason, not because nothing gets through."""
    answer = await send(fresh.port, "/public/x?page=2")
    assert answer.status == 200
    assert upstream_paths(fresh) == ["/public/x?page=2"]
    token = fresh.idp.mint({"sub": "alice"})
    answer = await send(fresh.port, "/orders/1", headers=(("Authorization", f"Bearer {token}"),))
    assert answer.status == 200
    assert upstream_paths(fresh)[-1] == "/orders/1"


FORGED = (("X-User-Id", "admin"), ("X-User-Role", "admin"), ("X-Auth-Claims", FORGED_CLAIMS))


@pytest.mark.parametrize(("name", "value"), FORGED, ids=[name for name, _ in FORGED])
async def test_an_injected_identity_header_never_reaches_the_upstream(fresh: Stack, name: str, value: str) -> None:
    # Anonymous, on a public path: allowed, with no identity at all.
    answer = await send(fresh.port, "/public/x", headers=((name, value),))
    assert answer.status == 200
    (request,) = fresh.echo.requests
    assert name.lower() not in {header for header, _ in request["headers"]}
    # With a token: the service's identity, never the client's (alice has no role claim).
    token = fresh.idp.mint({"sub": "alice"})
    answer = await send(fresh.port, "/orders/1", headers=(("Authorization", f"Bearer {token}"), (name, value)))
    assert answer.status == 200
    assert fresh.echo.headers_named("x-user-id") == ["alice"]
    assert fresh.echo.headers_named("x-user-role") == []
    (claims,) = fresh.echo.headers_named("x-auth-claims")
    assert json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))["sub"] == "alice"
    # A token whose role claim the service does set: the service's value, not the client's, and once.
    token = fresh.idp.mint({"sub": "bob", "role": "user"})
    answer = await send(fresh.port, "/orders/2", headers=(("Authorization", f"Bearer {token}"), (name, value)))
    assert answer.status == 200
    assert fresh.echo.headers_named("x-user-id") == ["bob"]
    assert fresh.echo.headers_named("x-user-role") == ["user"]
    assert_no_client_identity(fresh, (value,))


async def test_an_underscore_spelling_of_an_identity_header_never_reaches_the_upstream(fresh: Stack) -> None:
    token = fresh.idp.mint({"sub": "alice"})
    answer = await send(
        fresh.port, "/orders/1", headers=(("Authorization", f"Bearer {token}"), ("X_User_Role", "admin"))
    )
    # Envoy refuses it (headers_with_underscores_action: REJECT_REQUEST); nginx drops it
    # (underscores_in_headers off).
    assert answer.status in (200, 400)
    assert_no_client_identity(fresh, ("admin",))


async def test_policies_never_see_a_client_identity_header(fresh: Stack) -> None:
    """The naive by-role-header policy would allow this if the client's header reached the check."""
    answer = await send(fresh.port, "/by-role/x", headers=(("X-User-Role", "admin"),))
    assert answer.status == 401
    assert fresh.echo.requests == []


@pytest.mark.parametrize("name", ["access_token", "access%5Ftoken"])
async def test_a_query_token_is_neither_forwarded_nor_logged(fresh: Stack, name: str) -> None:
    """A percent-encoded spelling of the name is refused by the service (400 ambiguous_path) or, where
    a proxy sees it first, removed like the plain one: either way the upstream never gets the token."""
    token = fresh.idp.mint({"sub": "alice"})
    # The log is the module's: wait for one line more than before, not for any line of the path.
    before = logged_lines(fresh)
    answer = await send(fresh.port, f"/public/seams-log?a=1&{name}={token}&page=2")
    if name == "access_token" or answer.status != 400:
        assert answer.status == 200
        assert upstream_paths(fresh) == ["/public/seams-log?a=1&page=2"]
        assert fresh.echo.headers_named("x-user-id") == ["alice"]
    else:
        assert fresh.echo.requests == []
        assert len(answer.header("www-authenticate")) == 1, answer.headers  # nginx adds it to a 400 once

    def logged() -> str:
        return fresh.access_log.read_text() if logged_lines(fresh) > before else ""

    log = await wait_until(logged, 10, f"the {fresh.proxy} access log line")
    assert token not in log
    assert "access_token" not in log
    assert "access%5Ftoken" not in log


def logged_lines(stack: Stack) -> int:
    """How many access log lines name the path the query-token cases use."""
    text = stack.access_log.read_text() if stack.access_log.exists() else ""
    return sum("/public/seams-log" in line for line in text.splitlines())


async def test_a_401_carries_one_challenge(fresh: Stack) -> None:
    answer = await send(fresh.port, "/admin/x")
    assert answer.status == 401
    assert answer.header("www-authenticate") == ['Bearer realm="authz-service"']
