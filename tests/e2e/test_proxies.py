"""HTTP mode end to end: the shipped envoy/envoy-http.yaml (Envoy's http_service) and the shipped
deploy/nginx/nginx.conf (auth_request), each with the real proxy, the service as a subprocess with
`http_address`, the demo IdP and the echo upstream. Nothing is mocked."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from authz_service.devstack import nginx as nginx_launcher
from authz_service.devstack.echo import EchoUpstream
from authz_service.devstack.envoy import Envoy, StartError, load_config, on_loopback
from authz_service.devstack.idp import DevIdentityProvider
from tests.conftest import free_port, jwks_introspector, run_service, tail
from tests.e2e.conftest import START_TIMEOUT, stop_process, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

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


Proxy = Callable[[int, EchoUpstream, Path, aiohttp.ClientSession], Any]


@asynccontextmanager
async def envoy_http(authz_port: int, echo: EchoUpstream, workdir: Path, session: aiohttp.ClientSession) -> Any:
    config = on_loopback(
        load_config(ENVOY_HTTP_YAML),
        listener=free_port(),
        admin=free_port(),
        clusters={"authz_http": authz_port, "upstream": echo.port},
    )
    envoy = Envoy.start(config, workdir)
    try:
        try:
            await envoy.wait_ready(session, {"authz_http": 1}, START_TIMEOUT)
        except StartError as err:
            pytest.fail(f"{err}:\n{envoy.child.tail(30)}")
        yield envoy.url
    finally:
        await envoy.stop()


@asynccontextmanager
async def nginx(authz_port: int, echo: EchoUpstream, workdir: Path, session: aiohttp.ClientSession) -> Any:
    listener = free_port()
    config = nginx_launcher.on_loopback(
        NGINX_CONF.read_text(),
        listener=listener,
        upstreams={"authz_service": authz_port, "application": echo.port},
        workdir=workdir,
    )
    proxy = nginx_launcher.Nginx.start(config, listener, workdir)
    try:
        try:
            await proxy.wait_ready(session)
        except StartError as err:
            pytest.fail(f"{err}:\n{proxy.child.tail(30)}\n{tail(proxy.error_log)}")
        yield proxy.url
    finally:
        await proxy.stop()


PROXIES = {"envoy-http": envoy_http, "nginx": nginx}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        yield client


@pytest.fixture(params=sorted(PROXIES))
async def start_stack(
    request: pytest.FixtureRequest, idp: DevIdentityProvider, tmp_path: Path, session: aiohttp.ClientSession
) -> AsyncIterator[Callable[[], Awaitable[Stack]]]:
    """Start the service (HTTP mode), an echo upstream and the proxy under test; stopped afterwards."""
    proxy = PROXIES[request.param]
    async with EchoUpstream() as echo:
        cleanups: list[Any] = []

        async def start() -> Stack:
            port = free_port()
            config = {
                "server": {
                    "grpc_address": f"127.0.0.1:{free_port()}",
                    "http_address": f"127.0.0.1:{port}",
                    "admin_address": None,
                    "drain_delay": 0,
                },
                "response": {"claim_headers": {"email": "x-user-email"}},
                "introspectors": [jwks_introspector(idp, from_params=["access_token"])],
                "policies": POLICIES,
            }
            path = tmp_path / "authz.yaml"
            path.write_text(yaml.safe_dump(config))
            log = tmp_path / "authz.log"
            process = await run_service(path, log)
            cleanups.append(process)

            async def serving() -> bool:
                assert process.returncode is None, tail(log)
                try:
                    async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_until(serving, START_TIMEOUT, "the HTTP listener to be ready")
            context = proxy(port, echo, tmp_path, session)
            url = await context.__aenter__()
            cleanups.append(context)
            return Stack(url, echo, request.param)

        yield start
        for item in reversed(cleanups):
            if hasattr(item, "__aexit__"):
                await item.__aexit__(None, None, None)
            else:
                assert await stop_process(item) == 0


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
        assert response.headers["www-authenticate"] == 'Bearer realm="authz-service"'
        assert await response.json(content_type=None) == {
            "error": "unauthorized",
            "error_description": "authentication required",
        }
    async with session.get(stack.url + "/orders/7", headers=bearer("not-a-jwt")) as response:
        assert response.status == 401
        assert 'error="invalid_token"' in response.headers["www-authenticate"]
    assert stack.echo.requests == []


async def test_403_from_a_policy_on_the_original_path(
    start_stack: Callable[[], Awaitable[Stack]], idp: DevIdentityProvider, session: aiohttp.ClientSession
) -> None:
    stack = await start_stack()
    async with session.get(stack.url + "/admin/users", headers=bearer(idp.mint())) as response:
        assert response.status == 403
        assert (await response.json(content_type=None))["error"] == "access_denied"
    assert stack.echo.requests == []


async def test_503_when_the_idp_is_down_and_nothing_is_cached(
    start_stack: Callable[[], Awaitable[Stack]], idp: DevIdentityProvider, session: aiohttp.ClientSession
) -> None:
    await idp.go_offline()
    stack = await start_stack()
    async with session.get(stack.url + "/orders/7", headers=bearer(idp.mint())) as response:
        assert response.status == 503
        body = await response.read()
    if stack.proxy == "envoy-http":
        # Envoy takes any 5xx from an HTTP authorization service for a failure to ask and answers
        # status_on_error (503 in envoy-http.yaml) itself, without the service's body.
        assert body == b""
    else:
        assert json.loads(body)["error"] == "temporarily_unavailable"
    assert stack.echo.requests == []


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
    assert "access_token" not in seen["path"]
    assert "room=1" in seen["path"]
    assert "x=2" in seen["path"]
