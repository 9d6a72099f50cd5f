"""Issue #23 through the real proxies, with the configs `authz-service proxy-config` writes for a
service config with a `responses` block and an identity token (the shipped files are its output
for examples/demo.yaml). nginx's auth_request cannot pass a 302 on, so its config asks the service
for the login redirect as a 401 naming the target and sends the 302 itself; Envoy's http_service
passes the 302, and the block's headers its allowed_client_headers lists. The identity token
reaches the upstream, and a client's own copy never does. The service runs as a subprocess."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import aiohttp
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from authz_service import proxyconfig
from authz_service.devstack.echo import EchoUpstream
from authz_service.devstack.envoy import Envoy, StartError, on_loopback
from authz_service.devstack.envoy import load_config as load_envoy_config
from authz_service.registries import load_config
from tests.conftest import free_port, jwks_introspector, new_idp, run_service, tail
from tests.e2e.conftest import START_TIMEOUT, stop_process, wait_until
from tests.e2e.test_proxies import nginx_config, run_nginx

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BROWSER = "text/html,application/xhtml+xml,*/*;q=0.8"
PEM = ec.generate_private_key(ec.SECP256R1()).private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        yield client


async def test_nginx_sends_the_login_redirect_on_and_the_identity_token_upstream(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
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
            "responses": {"unauthenticated": {"redirect": {"url": "https://login.example.com/?rd={url}"}}},
            "response": {
                "identity_token": {
                    "issuer": f"http://127.0.0.1:{admin_port}",
                    "audience": "app",
                    "keys": [{"kid": "k1", "alg": "ES256", "private_pem": PEM}],
                }
            },
            "introspectors": [jwks_introspector(idp)],
        }
        path = tmp_path / "authz.yaml"
        path.write_text(yaml.safe_dump(config))
        log = tmp_path / "authz.log"
        process = await run_service(path, log)
        try:

            async def serving() -> bool:
                assert process.returncode is None, tail(log)
                try:
                    async with session.get(f"http://127.0.0.1:{http_port}/readyz") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_until(serving, START_TIMEOUT, "the HTTP listener to be ready")
            listener = free_port()
            prefix = tmp_path / "nginx"
            prefix.mkdir()
            text = nginx_config(listener, http_port, echo.port, proxyconfig.render("nginx", load_config(path)))
            async with run_nginx(text, listener, prefix, session) as proxy:
                # A browser without a token: nginx's own 302 to the login page, nothing else.
                async with session.get(
                    proxy.url + "/orders/7?x=1", headers={"Accept": BROWSER}, allow_redirects=False
                ) as response:
                    assert response.status == 302
                    original = "http://127.0.0.1/orders/7?x=1"  # nginx's $host: no port
                    assert response.headers["Location"] == "https://login.example.com/?rd=" + quote(original, safe="")
                    assert "WWW-Authenticate" not in response.headers
                # An API client keeps its 401 and challenge.
                async with session.get(proxy.url + "/orders/7", headers={"Accept": "application/json"}) as response:
                    assert response.status == 401
                    assert response.headers["WWW-Authenticate"] == 'Bearer realm="authz-service"'
                    assert (await response.json())["error"] == "unauthorized"
                assert echo.requests == []

                # An allow: the upstream gets the service's token, never the client's.
                credential = idp.mint({"sub": "alice"})
                headers = {"Authorization": f"Bearer {credential}", "X-Identity-Token": "forged"}
                async with session.get(proxy.url + "/orders/7", headers=headers) as response:
                    assert response.status == 200
                    seen = await response.json()
                (token,) = seen["headers"]["x-identity-token"]
                async with session.get(f"http://127.0.0.1:{admin_port}/.well-known/jwks.json") as response:
                    key = jwt.PyJWKSet.from_dict(await response.json())["k1"]
                claims = jwt.decode(token, key.key, algorithms=["ES256"], audience="app")
                assert claims["sub"] == "alice"
                assert claims["introspector"] == "idp"
        finally:
            assert await stop_process(process) == 0


async def test_envoy_http_passes_the_redirect_the_block_s_headers_and_the_identity_token(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
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
            "responses": {
                "unauthenticated": {
                    "redirect": {"url": "/login?rd={url}"},
                    "headers": {"x-reason": "{reason}"},
                    "body": {"content_type": "application/json", "text": '{"why": "{description}"}'},
                }
            },
            "response": {
                "identity_token": {
                    "issuer": f"http://127.0.0.1:{admin_port}",
                    "audience": "app",
                    "keys": [{"kid": "k1", "alg": "ES256", "private_pem": PEM}],
                }
            },
            "introspectors": [jwks_introspector(idp)],
        }
        path = tmp_path / "authz.yaml"
        path.write_text(yaml.safe_dump(config))
        process = await run_service(path, tmp_path / "authz.log")
        try:

            async def serving() -> bool:
                assert process.returncode is None, tail(tmp_path / "authz.log")
                try:
                    async with session.get(f"http://127.0.0.1:{http_port}/readyz") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_until(serving, START_TIMEOUT, "the HTTP listener to be ready")
            generated = tmp_path / "envoy-http.yaml"
            generated.write_text(proxyconfig.render("envoy-http", load_config(path)))
            envoy_config = on_loopback(
                load_envoy_config(generated),
                listener=free_port(),
                admin=free_port(),
                clusters={"authz_http": http_port, "upstream": echo.port},
            )
            envoy = Envoy.start(envoy_config, tmp_path)
            try:
                try:
                    await envoy.wait_ready(session, {"authz_http": 1}, START_TIMEOUT)
                except StartError as err:
                    pytest.fail(f"{err}:\n{envoy.child.tail(30)}")
                async with session.get(
                    envoy.url + "/orders/7", headers={"Accept": BROWSER}, allow_redirects=False
                ) as response:
                    assert response.status == 302
                    assert response.headers["Location"].startswith("/login?rd=http%3A%2F%2F127.0.0.1%3A")
                    assert response.headers["Location"].endswith("%2Forders%2F7")
                    assert response.headers["x-reason"] == "missing_token"
                async with session.get(envoy.url + "/orders/7") as response:
                    assert response.status == 401
                    assert response.headers["x-reason"] == "missing_token"
                    assert response.headers["www-authenticate"] == 'Bearer realm="authz-service"'
                    assert await response.json() == {"why": "authentication required"}
                assert echo.requests == []

                credential = idp.mint({"sub": "erin"})
                headers = {"Authorization": f"Bearer {credential}", "X-Identity-Token": "forged"}
                async with session.get(envoy.url + "/orders/7", headers=headers) as response:
                    assert response.status == 200
                    seen = await response.json()
                (token,) = seen["headers"]["x-identity-token"]
                async with session.get(f"http://127.0.0.1:{admin_port}/.well-known/jwks.json") as response:
                    key = jwt.PyJWKSet.from_dict(await response.json())["k1"]
                assert jwt.decode(token, key.key, algorithms=["ES256"], audience="app")["sub"] == "erin"
            finally:
                await envoy.stop()
        finally:
            assert await stop_process(process) == 0
