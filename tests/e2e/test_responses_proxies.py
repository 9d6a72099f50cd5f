"""Issue #23 through the real proxies, with the configs `authz-service proxy-config` writes for a
service config with a `responses` block and an identity token (the shipped files are its output
for examples/demo.yaml). nginx's auth_request cannot pass a 302 on, so its config asks the service
for the login redirect as a 401 naming the target and sends the 302 itself; Envoy's http_service
passes the 302, and the block's headers its allowed_client_headers lists. The identity token
reaches the upstream, and a client's own copy never does. The service runs as a subprocess."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from authz_service import proxyconfig
from authz_service.devstack.echo import EchoUpstream
from authz_service.registries import load_config
from tests.conftest import free_port, jwks_introspector, new_idp
from tests.e2e.conftest import run_http_service
from tests.e2e.test_proxies import envoy_http, nginx
from tests.hostile_idp import HostileIdentityProvider

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BROWSER = "text/html,application/xhtml+xml,*/*;q=0.8"
PEM = ec.generate_private_key(ec.SECP256R1()).private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        yield client


@dataclass
class Served:
    """The service behind a proxy configured by `authz-service proxy-config` for its config."""

    url: str  # the proxy's
    idp: HostileIdentityProvider
    echo: EchoUpstream
    admin_port: int  # the service's admin listener: the identity token's JWKS

    async def identity_token(self, session: aiohttp.ClientSession, credential: str) -> dict[str, Any]:
        """The claims of the identity token the upstream got with an allowed request that also
        carries a client's own (forged) X-Identity-Token, verified with the service's JWKS."""
        headers = {"Authorization": f"Bearer {credential}", "X-Identity-Token": "forged"}
        async with session.get(self.url + "/orders/7", headers=headers) as response:
            assert response.status == 200
            seen = await response.json()
        (token,) = seen["headers"]["x-identity-token"]
        async with session.get(f"http://127.0.0.1:{self.admin_port}/.well-known/jwks.json") as response:
            key = jwt.PyJWKSet.from_dict(await response.json())["k1"]
        claims: dict[str, Any] = jwt.decode(token, key.key, algorithms=["ES256"], audience="app")
        return claims


@asynccontextmanager
async def serve(
    proxy: str, responses: dict[str, Any], workdir: Path, session: aiohttp.ClientSession
) -> AsyncIterator[Served]:
    """The service in HTTP mode with this `responses` block and an identity token, an IdP, an echo
    upstream and the proxy (nginx or envoy-http) on its generated config, until the block ends."""
    http_port, admin_port = free_port(), free_port()
    async with await new_idp() as idp, EchoUpstream() as echo:
        config = {
            "server": {
                "grpc_address": f"127.0.0.1:{free_port()}",
                "http_address": f"127.0.0.1:{http_port}",
                "admin_address": f"127.0.0.1:{admin_port}",
                "drain_delay": 0,
            },
            "authentication_only": True,
            "responses": responses,
            "response": {
                "identity_token": {
                    "issuer": f"http://127.0.0.1:{admin_port}",
                    "audience": "app",
                    "keys": [{"kid": "k1", "alg": "ES256", "private_pem": PEM}],
                }
            },
            "introspectors": [jwks_introspector(idp)],
        }
        async with run_http_service(config, workdir, session) as service:
            generated = proxyconfig.render(proxy, load_config(service.config))
            run_proxy = {"nginx": nginx, "envoy-http": envoy_http}[proxy]
            async with run_proxy(http_port, echo, workdir, session, generated) as running:
                yield Served(running.url, idp, echo, admin_port)


async def test_nginx_sends_the_login_redirect_on_and_the_identity_token_upstream(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    responses = {"unauthenticated": {"redirect": {"url": "https://login.example.com/?rd={url}"}}}
    async with serve("nginx", responses, tmp_path, session) as served:
        # A browser without a token: nginx's own 302 to the login page, nothing else.
        async with session.get(
            served.url + "/orders/7?x=1", headers={"Accept": BROWSER}, allow_redirects=False
        ) as response:
            assert response.status == 302
            original = "http://127.0.0.1/orders/7?x=1"  # nginx's $host: no port
            assert response.headers["Location"] == "https://login.example.com/?rd=" + quote(original, safe="")
            assert "WWW-Authenticate" not in response.headers
        # An API client keeps its 401 and challenge.
        async with session.get(served.url + "/orders/7", headers={"Accept": "application/json"}) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"] == 'Bearer realm="authz-service"'
            assert (await response.json())["error"] == "unauthorized"
        assert served.echo.requests == []

        # An allow: the upstream gets the service's token, never the client's.
        claims = await served.identity_token(session, served.idp.mint({"sub": "alice"}))
        assert claims["sub"] == "alice"
        assert claims["introspector"] == "idp"


async def test_envoy_http_passes_the_redirect_the_block_s_headers_and_the_identity_token(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    responses = {
        "unauthenticated": {
            "redirect": {"url": "/login?rd={url}"},
            "headers": {"x-reason": "{reason}"},
            "body": {"content_type": "application/json", "text": '{"why": "{description}"}'},
        }
    }
    async with serve("envoy-http", responses, tmp_path, session) as served:
        async with session.get(
            served.url + "/orders/7", headers={"Accept": BROWSER}, allow_redirects=False
        ) as response:
            assert response.status == 302
            assert response.headers["Location"].startswith("/login?rd=http%3A%2F%2F127.0.0.1%3A")
            assert response.headers["Location"].endswith("%2Forders%2F7")
            assert response.headers["x-reason"] == "missing_token"
        async with session.get(served.url + "/orders/7") as response:
            assert response.status == 401
            assert response.headers["x-reason"] == "missing_token"
            assert response.headers["www-authenticate"] == 'Bearer realm="authz-service"'
            assert await response.json() == {"why": "authentication required"}
        assert served.echo.requests == []

        claims = await served.identity_token(session, served.idp.mint({"sub": "erin"}))
        assert claims["sub"] == "erin"
