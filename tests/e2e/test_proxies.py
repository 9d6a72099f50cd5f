"""HTTP mode end to end: the shipped envoy/envoy-http.yaml (Envoy's http_service) and the shipped
deploy/nginx/nginx.conf (auth_request), each with the real proxy, the service as a subprocess with
`http_address`, the demo IdP and the echo upstream. Nothing is mocked.

nginx runs the shipped file with only its listener and upstream ports replaced, with its prefix
(`-p`) in a work directory: its pid file, temporary files and access log live there, as the file
says, which is also what lets it run as an unprivileged user (tested below)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
import pytest_asyncio
import yaml

from authz_service.devstack.echo import EchoUpstream
from authz_service.devstack.envoy import StartError, load_config, on_loopback
from authz_service.devstack.idp import DevIdentityProvider
from authz_service.devstack.nginx import Nginx, nginx_binary
from authz_service.devstack.procs import spawn
from tests.conftest import free_port, jwks_introspector, new_idp, tail
from tests.e2e.conftest import run_envoy, run_http_service, wait_until
from tests.hostile_idp import HostileIdentityProvider

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

ROOT = Path(__file__).resolve().parents[2]
ENVOY_HTTP_YAML = ROOT / "envoy" / "envoy-http.yaml"
NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"
POLICIES = [
    {"id": "signed-in", "engine": "matcho", "matcho": {"uri": {"$not": "#^/admin"}, "introspector": "present?"}},
]


@dataclass
class Stack:
    """A proxy in front of the echo upstream, asking the service in HTTP mode."""

    url: str
    echo: EchoUpstream
    proxy: str
    access_log: Path  # where the proxy writes its access log lines
    authz_log: Path | None = None  # the service's output (decision log lines)


@dataclass
class Running:
    """A started proxy: its URL and its access log."""

    url: str
    access_log: Path


Proxy = Callable[[int, EchoUpstream, Path, aiohttp.ClientSession], Any]


@asynccontextmanager
async def envoy_http(
    authz_port: int, echo: EchoUpstream, workdir: Path, session: aiohttp.ClientSession, text: str | None = None
) -> AsyncIterator[Running]:
    """Envoy on the shipped envoy-http.yaml (or `authz-service proxy-config envoy-http` output for
    another config) with only its ports replaced."""
    config = on_loopback(
        load_config(ENVOY_HTTP_YAML) if text is None else yaml.safe_load(text),
        listener=free_port(),
        admin=free_port(),
        clusters={"authz_http": authz_port, "upstream": echo.port},
    )
    async with run_envoy(config, workdir, session, "authz_http") as envoy:
        yield Running(envoy.url, envoy.access_log)


def nginx_config(listener: int, authz_port: int, application_port: int, text: str | None = None) -> str:
    """The shipped nginx.conf (or `authz-service proxy-config nginx` output for another config)
    with only its listener and the two upstreams' servers on other ports."""
    text = NGINX_CONF.read_text() if text is None else text
    for pattern, replacement in (
        (r"listen 127\.0\.0\.1:\d+;", f"listen 127.0.0.1:{listener};"),
        (r"(upstream authz_service \{\s*server )127\.0\.0\.1:\d+;", rf"\g<1>127.0.0.1:{authz_port};"),
        (r"(upstream application \{\s*server )127\.0\.0\.1:\d+;", rf"\g<1>127.0.0.1:{application_port};"),
    ):
        text, count = re.subn(pattern, replacement, text)
        assert count == 1, f"nginx.conf no longer has one line matching {pattern!r}"
    return text


@asynccontextmanager
async def run_nginx(
    config: str, listener: int, prefix: Path, session: aiohttp.ClientSession, argv_prefix: tuple[str, ...] = ()
) -> AsyncIterator[Nginx]:
    """nginx in the foreground on this config, with `prefix` as its -p (where the config puts its
    pid file, temporary files and access log), until the block ends."""
    path = prefix / "nginx.conf"
    path.write_text(config)
    path.chmod(0o644)
    log = prefix / "nginx.log"  # the config logs errors to stderr
    argv = [*argv_prefix, nginx_binary(), "-p", f"{prefix}/", "-c", str(path), "-g", "daemon off;"]
    proxy = Nginx(spawn("nginx", argv, log), listener, log)
    try:
        try:
            await proxy.wait_ready(session)
        except StartError as err:
            pytest.fail(f"{err}:\n{tail(log)}")
        yield proxy
    finally:
        await proxy.stop()


@asynccontextmanager
async def nginx(
    authz_port: int, echo: EchoUpstream, workdir: Path, session: aiohttp.ClientSession, text: str | None = None
) -> AsyncIterator[Running]:
    """nginx on the shipped nginx.conf (or `authz-service proxy-config nginx` output for another
    config) with only its ports replaced."""
    listener = free_port()
    prefix = workdir / "nginx"
    prefix.mkdir()
    async with run_nginx(nginx_config(listener, authz_port, echo.port, text), listener, prefix, session) as proxy:
        yield Running(proxy.url, prefix / "access.log")


PROXIES = {"envoy-http": envoy_http, "nginx": nginx}
# (proxy, HTTP mode's server): Envoy's http_service against both servers, nginx against the default.
STACKS = [("envoy-http", "granian"), ("envoy-http", "aiohttp"), ("nginx", "granian")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def idp_m() -> AsyncIterator[HostileIdentityProvider]:
    async with await new_idp() as provider:
        yield provider


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def session_m() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        yield client


# The module's tests run in its event loop, with its IdP and session (not conftest's per-test ones).
@pytest.fixture
def idp(idp_m: HostileIdentityProvider) -> HostileIdentityProvider:
    return idp_m


@pytest.fixture
def session(session_m: aiohttp.ClientSession) -> aiohttp.ClientSession:
    return session_m


@asynccontextmanager
async def run_stack(
    proxy: str, idp: DevIdentityProvider, workdir: Path, session: aiohttp.ClientSession, engine: str = "granian"
) -> AsyncIterator[Stack]:
    """The service (HTTP mode on `engine`), an echo upstream and the proxy under test, until the block ends."""
    port = free_port()
    config = {
        "server": {
            "grpc_address": f"127.0.0.1:{free_port()}",
            "http_address": f"127.0.0.1:{port}",
            "http_engine": engine,
            "admin_address": None,
            "drain_delay": 0,
        },
        "response": {"claim_headers": {"email": "x-user-email"}},
        "introspectors": [jwks_introspector(idp, from_params=["access_token"])],
        "policies": POLICIES,
    }
    async with (
        EchoUpstream() as echo,
        run_http_service(config, workdir, session) as service,
        PROXIES[proxy](port, echo, workdir, session) as running,
    ):
        yield Stack(running.url, echo, proxy, running.access_log, service.log)


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=STACKS, ids="-".join)
async def shared_stack(
    request: pytest.FixtureRequest,
    idp_m: HostileIdentityProvider,
    session_m: aiohttp.ClientSession,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Stack]:
    """One stack per proxy for the module: each start costs seconds."""
    proxy, engine = request.param
    workdir = tmp_path_factory.mktemp(f"proxies-{proxy}-{engine}")
    async with run_stack(proxy, idp_m, workdir, session_m, engine) as stack:
        yield stack


@pytest.fixture
def start_stack(shared_stack: Stack) -> Callable[[], Awaitable[Stack]]:
    """The module's stack for this proxy, with its echo's request log emptied for this test."""

    async def start() -> Stack:
        shared_stack.echo.requests.clear()
        return shared_stack

    return start


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_allow_sends_the_identity_and_overwrites_a_spoofed_one(
    start_stack: Callable[[], Awaitable[Stack]], idp: DevIdentityProvider, session: aiohttp.ClientSession
) -> None:
    stack = await start_stack()
    token = idp.mint({"sub": "alice", "email": "alice@example.com"})
    spoofed = {"X-User-Id": "mallory", "X-User-Email": "mallory@example.com", "X-Auth-Claims": "e30"}
    async with session.get(stack.url + "/orders/7?full=1", headers={**bearer(token), **spoofed}) as response:
        assert response.status == 200
        seen = await response.json()
    assert seen["path"] == "/orders/7?full=1"
    assert seen["headers"]["x-user-id"] == ["alice"]
    assert seen["headers"]["x-user-email"] == ["alice@example.com"]
    (claims,) = seen["headers"]["x-auth-claims"]
    assert json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))["sub"] == "alice"
    # A claim header the service does not set this time is removed, not left as the client sent it.
    no_email = idp.mint({"sub": "bob"})
    async with session.get(stack.url + "/orders/7", headers={**bearer(no_email), **spoofed}) as response:
        assert response.status == 200
        seen = await response.json()
    assert seen["headers"]["x-user-id"] == ["bob"]
    assert "x-user-email" not in seen["headers"]


async def test_401_carries_the_challenge_and_json_body(
    start_stack: Callable[[], Awaitable[Stack]], session: aiohttp.ClientSession
) -> None:
    stack = await start_stack()
    async with session.get(stack.url + "/orders/7") as response:
        assert response.status == 401
        # Exactly once: nginx's auth_request copies it from the answer; the config adds no second one.
        assert response.headers.getall("www-authenticate") == ['Bearer realm="authz-service"']
        assert await response.json(content_type=None) == {
            "error": "unauthorized",
            "error_description": "authentication required",
        }
    async with session.get(stack.url + "/orders/7", headers=bearer("not-a-jwt")) as response:
        assert response.status == 401
        (challenge,) = response.headers.getall("www-authenticate")
        assert 'error="invalid_token"' in challenge
    # Two Authorization values: 400 (nginx's auth_request turns it into a 500; the config maps it back).
    async with session.get(
        stack.url + "/orders/7", headers=[("Authorization", "Bearer a"), ("Authorization", "Bearer b")]
    ) as response:
        assert response.status == 400
        assert len(response.headers.getall("www-authenticate", [])) <= 1
        if stack.proxy == "envoy-http":  # nginx refuses a repeated Authorization itself
            assert (await response.json(content_type=None))["error"] == "invalid_request"
    assert stack.echo.requests == []


async def test_403_from_a_policy_on_the_original_path(
    start_stack: Callable[[], Awaitable[Stack]], idp: DevIdentityProvider, session: aiohttp.ClientSession
) -> None:
    stack = await start_stack()
    async with session.get(stack.url + "/admin/users", headers=bearer(idp.mint())) as response:
        assert response.status == 403
        assert (await response.json(content_type=None))["error"] == "access_denied"
    assert stack.echo.requests == []


async def test_503_when_the_idp_is_down_and_the_key_is_not_cached(
    start_stack: Callable[[], Awaitable[Stack]], idp: HostileIdentityProvider, session: aiohttp.ClientSession
) -> None:
    stack = await start_stack()
    # A kid the service has no key for: it must ask the IdP, which is down (the keys it has cached
    # answer for every other kid, so the rest of the module is unaffected).
    token = idp.mint(kid="published-while-the-idp-was-down")
    await idp.go_offline()
    try:
        async with session.get(stack.url + "/orders/7", headers=bearer(token)) as response:
            assert response.status == 503
            body = await response.read()
    finally:
        await idp.go_online()  # the other tests share this IdP
    assert stack.echo.requests == []
    if stack.proxy == "envoy-http":
        # Envoy takes any 5xx from an HTTP authorization service for a failure to ask and answers
        # status_on_error (503 in envoy-http.yaml) itself, without the service's body.
        assert body == b""
    else:
        assert json.loads(body)["error"] == "temporarily_unavailable"


async def test_a_query_token_never_reaches_the_upstream(
    start_stack: Callable[[], Awaitable[Stack]], idp: DevIdentityProvider, session: aiohttp.ClientSession
) -> None:
    stack = await start_stack()
    token = idp.mint({"sub": "ws-client"})
    async with session.get(stack.url + f"/stream?room=1&access_token={token}&x=2") as response:
        assert response.status == 200
        seen = await response.json()
    assert seen["headers"]["x-user-id"] == ["ws-client"]
    assert token not in json.dumps(seen)
    assert seen["path"] == "/stream?room=1&x=2"
    # First, last, alone, percent-encoded: the rest of the query as it was, no stray `&` or `?`.
    for query, upstream in (
        (f"access_token={token}&page=2", "/stream?page=2"),
        (f"page=2&access_token={token}", "/stream?page=2"),
        (f"access_token={token}", "/stream"),
    ):
        async with session.get(stack.url + "/stream?" + query) as response:
            assert response.status == 200
            assert (await response.json())["path"] == upstream, query
    # `access%5Ftoken` is `access_token` once decoded: refused by the service (400) or removed too.
    stack.echo.requests.clear()
    async with session.get(stack.url + f"/stream?access%5Ftoken={token}&page=2") as response:
        if response.status == 400:
            assert stack.echo.requests == []
        else:
            assert response.status == 200
            assert (await response.json())["path"] == "/stream?page=2"

    # Nor does the proxy's access log record it: the path is logged without its query.
    def logged() -> str:
        text = stack.access_log.read_text() if stack.access_log.exists() else ""
        return text if text.count("/stream") >= 4 else ""

    log = await wait_until(logged, 10, "the access log lines")
    assert token not in log
    assert "access_token" not in log
    assert "access%5Ftoken" not in log


async def test_the_request_id_reaches_the_service_and_the_upstream(
    start_stack: Callable[[], Awaitable[Stack]], idp: DevIdentityProvider, session: aiohttp.ClientSession
) -> None:
    stack = await start_stack()
    # A client's own X-Request-ID is not what the service and the upstream see (nginx sets its own;
    # Envoy keeps an external one unless told otherwise, so only nginx is held to it).
    # A traced client's traceparent reaches the service through every proxy: its decision line names
    # the trace and the client's span.
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    headers = {**bearer(idp.mint()), "X-Request-ID": "client-chosen", "traceparent": f"00-{trace_id}-{span_id}-01"}
    async with session.get(stack.url + "/orders/9", headers=headers) as response:
        assert response.status == 200
        seen = await response.json()
    (request_id,) = seen["headers"]["x-request-id"]
    if stack.proxy == "nginx":
        assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    assert stack.authz_log is not None

    def decided() -> dict[str, Any] | None:
        for line in stack.authz_log.read_text().splitlines():  # type: ignore[union-attr]
            if f'"request_id": "{request_id}"' in line:
                return cast(dict[str, Any], json.loads(line))
        return None

    line = await wait_until(decided, 10, "the service's decision line with the same request id")
    assert (line["trace_id"], line["span_id"]) == (trace_id, span_id)


@pytest.fixture
def unprivileged_prefix() -> Any:
    """A prefix directory an unprivileged user owns (nobody, 65534, when the tests run as root), and
    the argv prefix that runs a command as that user."""
    prefix = Path(tempfile.mkdtemp(prefix="authz-nginx-", dir="/tmp"))
    argv: tuple[str, ...] = ()
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv (util-linux) is needed to drop root")
        os.chown(prefix, 65534, 65534)
        argv = (setpriv, "--reuid=65534", "--regid=65534", "--clear-groups")
    prefix.chmod(0o755)
    try:
        yield prefix, argv
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


async def test_nginx_runs_the_shipped_config_as_an_unprivileged_user(
    unprivileged_prefix: tuple[Path, tuple[str, ...]], session: aiohttp.ClientSession
) -> None:
    """docs/proxies.md's recipe: `nginx -p DIR -c nginx.conf` as any user owning DIR."""
    prefix, argv = unprivileged_prefix
    listener = free_port()
    config = nginx_config(listener, free_port(), free_port())  # nothing listens: the service is down
    async with run_nginx(config, listener, prefix, session, argv) as proxy:
        async with session.get(proxy.url + "/orders/7") as response:
            assert response.status == 503  # fail closed, answered by a working nginx
            assert (await response.json(content_type=None))["error"] == "temporarily_unavailable"
        assert int((prefix / "nginx.pid").read_text()) == proxy.child.process.pid
        for kind in ("client_body_temp", "proxy_temp"):
            assert (prefix / kind).is_dir()
        if argv:  # the master itself runs as nobody, not only its workers
            status = await asyncio.to_thread(Path(f"/proc/{proxy.child.process.pid}").stat)
            assert status.st_uid == 65534
        await wait_until(lambda: (prefix / "access.log").exists(), 5, "the access log under the prefix")
