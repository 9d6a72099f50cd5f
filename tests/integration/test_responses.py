"""Issue #23 items 2 and 3 through the running service: the `responses` block's deny answers (gRPC
Check, HTTP mode's /ext_authz and /forward_auth) and the signed identity token, verified by PyJWT
against the JWKS the admin listener serves. Real servers on 127.0.0.1, the test IdP for tokens."""

from __future__ import annotations

import asyncio
import json
import math
import signal
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import grpc
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from yarl import URL

from authz_service._pb.envoy.service.auth.v3 import external_auth_pb2 as pb
from authz_service.devstack.idp import DevIdentityProvider
from authz_service.envoy import encode_denial
from authz_service.model import Outcome, Reason
from tests.conftest import Spawn, StartService, free_port, jwks_introspector, sleep_past
from tests.harness import Answer, AuthorizationClient, Harness, check_request, config_from

LOGIN = "https://login.example.com/start?rd={url}"
BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
POLICIES = [{"id": "reports", "engine": "matcho", "matcho": {"uri": "#^/reports/", "jwt": {"sub": "present?"}}}]


def _pem(alg: str) -> str:
    key: Any
    if alg == "ES256":
        key = ec.generate_private_key(ec.SECP256R1())
    elif alg == "EdDSA":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem: bytes = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    return pem.decode()


# Made at import, off the event loop (an RSA key takes a good fraction of a second).
PEMS = {alg: _pem(alg) for alg in ("ES256", "EdDSA", "RS256")}
SECOND_ES256 = _pem("ES256")


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


def _server(admin_port: int | None = None) -> dict[str, Any]:
    return {
        "grpc_address": "127.0.0.1:0",
        "admin_address": f"127.0.0.1:{admin_port}" if admin_port else None,
        "http_address": "127.0.0.1:0",
    }


async def _start(start_service: StartService, config: Mapping[str, Any]) -> tuple[Harness, str]:
    harness = await start_service({"server": _server(), **config})
    assert harness.service.http is not None
    return harness, f"http://127.0.0.1:{harness.service.http.port}"


async def _denied(harness: Harness, path: str, **kwargs: Any) -> pb.DeniedHttpResponse:
    response = await harness.stub.Check(check_request(path, **kwargs), timeout=10)
    assert response.HasField("denied_response"), response
    return response.denied_response


def _headers(denied: pb.DeniedHttpResponse) -> dict[str, str]:
    return {option.header.key: option.header.value for option in denied.headers}


# --------------------------------------------------------------------------- deny answers


async def test_a_browser_is_redirected_to_login_and_an_api_client_keeps_its_401(
    idp: DevIdentityProvider, start_service: StartService, client: aiohttp.ClientSession
) -> None:
    responses = {"unauthenticated": {"redirect": {"url": LOGIN}}}
    harness, url = await _start(
        start_service,
        {"introspectors": [jwks_introspector(idp, from_params=["access_token"])], "responses": responses},
    )
    original = "http://api.example.com/reports/1?x=1"
    location = "https://login.example.com/start?rd=" + quote(original, safe="")

    # gRPC: a browser gets the 302; the token parameter never shows in {url}.
    denied = await _denied(harness, "/reports/1?x=1&access_token=secret", headers={"accept": BROWSER})
    assert denied.status.code == 302
    assert _headers(denied) == {"location": location}
    assert denied.body == ""
    for accept in (None, "*/*", "application/json", "application/json, text/plain, */*"):
        api = await _denied(harness, "/reports/1", headers={"accept": accept} if accept else {})
        assert api.status.code == 401
        assert _headers(api)["www-authenticate"] == 'Bearer realm="authz-service"'
        assert json.loads(api.body) == {"error": "unauthorized", "error_description": "authentication required"}

    # HTTP mode: Envoy's http_service and Traefik pass the 302 on as it is.
    async with client.get(
        url + "/ext_authz/reports/1?x=1", headers={"Accept": BROWSER, "Host": "api.example.com"}, allow_redirects=False
    ) as response:
        assert response.status == 302
        assert response.headers["location"] == location
        assert "www-authenticate" not in response.headers
    traefik = {"X-Forwarded-Uri": "/reports/1?x=1", "X-Forwarded-Host": "api.example.com", "Accept": BROWSER}
    async with client.get(url + "/forward_auth", headers=traefik, allow_redirects=False) as response:
        assert response.status == 302
        assert response.headers["location"] == location
    # nginx cannot pass a 302 from auth_request: it asks for a 401 naming the target instead.
    nginx = {**traefik, "X-Authz-Redirect-As": "401"}
    async with client.get(url + "/forward_auth", headers=nginx, allow_redirects=False) as response:
        assert response.status == 401
        assert response.headers["x-authz-location"] == location
        assert "www-authenticate" not in response.headers
        assert "location" not in response.headers
    async with client.get(url + "/forward_auth", headers={**traefik, "Accept": "application/json"}) as response:
        assert response.status == 401
        assert response.headers["www-authenticate"] == 'Bearer realm="authz-service"'
        assert "x-authz-location" not in response.headers


HOSTILE = "/a\"b'<script>alert(1)</script>"


async def test_templated_headers_and_bodies_are_escaped_for_where_they_land(
    idp: DevIdentityProvider, start_service: StartService, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    page = tmp_path / "forbidden.html"
    page.write_text("<html><body><p>No access to {path} ({method})</p><a href='{url}'>x</a></body></html>")
    responses = {
        "unauthenticated": {
            "headers": {"x-reason": "{reason}", "x-path": "{path}"},
            "body": {
                "content_type": "application/json",
                "text": '{"error": "{error}", "description": "{description}", "path": "{path}"}',
            },
        },
        "forbidden": {"body": {"content_type": "text/html", "file": str(page)}},
    }
    harness, url = await _start(
        start_service, {"introspectors": [jwks_introspector(idp)], "policies": POLICIES, "responses": responses}
    )

    denied = await _denied(harness, HOSTILE)
    assert denied.status.code == 401
    headers = _headers(denied)
    assert headers["x-reason"] == "missing_token"
    assert headers["x-path"] == HOSTILE  # printable ASCII stays as it is in a header
    assert headers["www-authenticate"] == 'Bearer realm="authz-service"'
    assert headers["content-type"] == "application/json"
    assert headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in denied.body
    assert "\\u003cscript\\u003e" in denied.body
    assert json.loads(denied.body) == {
        "error": "unauthorized",
        "description": "authentication required",
        "path": HOSTILE,
    }

    token = idp.mint({"sub": "alice"})
    forbidden = await _denied(harness, "/other" + HOSTILE, token=token)
    assert forbidden.status.code == 403
    assert _headers(forbidden)["content-type"] == "text/html; charset=utf-8"
    assert "<script>" not in forbidden.body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in forbidden.body
    assert "&quot;b&#x27;" in forbidden.body
    assert "<p>No access to /other/a" in forbidden.body
    assert "(GET)</p>" in forbidden.body

    # A raw CR LF in the path lands percent-encoded in the header, and escaped in the JSON body.
    crlf = await _denied(harness, "/a\r\nx-injected: 1")
    assert crlf.status.code == 401
    assert json.loads(crlf.body)["path"] == "/a\r\nx-injected: 1"
    assert _headers(crlf)["x-path"] == "/a%0D%0Ax-injected: 1"
    assert "x-injected" not in _headers(crlf)

    # HTTP mode renders the same answers, and still names the error for nginx.
    sent = quote(HOSTILE, safe="/")
    async with client.get(URL(url + "/ext_authz" + sent, encoded=True)) as response:
        assert response.status == 401
        assert response.headers["x-reason"] == "missing_token"
        assert response.headers["x-authz-error"] == "unauthorized"
        body = await response.read()
        assert b"<script>" not in body
        assert json.loads(body)["path"] == sent
    async with client.get(url + "/ext_authz/other", headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 403
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        assert "<p>No access to /other (GET)</p>" in await response.text()


async def test_without_a_responses_block_denials_are_todays_bytes(
    idp: DevIdentityProvider, start_service: StartService, client: aiohttp.ClientSession
) -> None:
    only_forbidden = {"forbidden": {"headers": {"x-reason": "{reason}"}}}
    extras: list[dict[str, Any]] = [{}, {"responses": {}}, {"responses": only_forbidden}]
    for extra in extras:
        harness, url = await _start(start_service, {"introspectors": [jwks_introspector(idp)], **extra})
        response = await harness.stub.Check(check_request("/x", headers={"accept": BROWSER}), timeout=10)
        assert response.SerializeToString() == encode_denial(Outcome.UNAUTHENTICATED, Reason.MISSING_TOKEN)
        async with client.get(url + "/ext_authz/x", headers={"Accept": BROWSER}) as answer:
            assert answer.status == 401
            assert json.loads(await answer.read()) == {
                "error": "unauthorized",
                "error_description": "authentication required",
            }


async def test_a_changed_responses_block_takes_effect_on_reload(
    idp: DevIdentityProvider, start_service: StartService
) -> None:
    config: dict[str, Any] = {"server": _server(), "introspectors": [jwks_introspector(idp)]}
    harness = await start_service(config)
    assert (await _denied(harness, "/x", headers={"accept": BROWSER})).status.code == 401
    responses = {"unauthenticated": {"redirect": {"url": "/login?rd={url}"}}}
    await harness.service.reload(config_from({**config, "responses": responses}))
    denied = await _denied(harness, "/x", headers={"accept": BROWSER})
    assert denied.status.code == 302
    assert _headers(denied)["location"] == "/login?rd=" + quote("http://api.example.com/x", safe="")
    await harness.service.reload(config_from(config))
    assert (await _denied(harness, "/x", headers={"accept": BROWSER})).status.code == 401


# --------------------------------------------------------------------------- the identity token


def _identity_config(
    idp: DevIdentityProvider, admin_port: int, keys: list[dict[str, str]], **extra: Any
) -> dict[str, Any]:
    return {
        "server": _server(admin_port),
        "response": {
            "identity_token": {
                "issuer": f"http://127.0.0.1:{admin_port}",
                "audience": ["orders-api"],
                "ttl": 300,
                "claims": ["email", "roles"],
                "keys": keys,
            }
        },
        "introspectors": [jwks_introspector(idp)],
        **extra,
    }


async def _verify(client: aiohttp.ClientSession, admin: str, token: str) -> dict[str, Any]:
    """The token's claims, verified by PyJWT with the key the admin listener publishes (found
    through the discovery document's jwks_uri)."""
    async with client.get(admin + "/.well-known/openid-configuration") as response:
        assert response.status == 200
        discovery = await response.json()
    assert discovery["jwks_uri"] == admin + "/.well-known/jwks.json"
    async with client.get(discovery["jwks_uri"]) as response:
        assert response.status == 200
        jwks = await response.json()
    header = jwt.get_unverified_header(token)
    key = jwt.PyJWKSet.from_dict(jwks)[header["kid"]]
    claims: dict[str, Any] = jwt.decode(
        token, key.key, algorithms=[header["alg"]], audience="orders-api", issuer=discovery["issuer"]
    )
    return claims


@pytest.mark.parametrize("alg", ["ES256", "RS256", "EdDSA"])
async def test_the_identity_token_verifies_against_the_served_jwks(
    alg: str, idp: DevIdentityProvider, start_service: StartService, client: aiohttp.ClientSession
) -> None:
    port = free_port()
    # Rotation: the first key signs, both are published.
    keys = [
        {"kid": f"{alg}-new", "alg": alg, "private_pem": PEMS[alg]},
        {"kid": "old", "alg": "ES256", "private_pem": SECOND_ES256},
    ]
    harness = await start_service(_identity_config(idp, port, keys, policies=POLICIES))
    admin = f"http://127.0.0.1:{port}"
    async with client.get(admin + "/.well-known/jwks.json") as response:
        assert [key["kid"] for key in (await response.json())["keys"]] == [f"{alg}-new", "old"]

    credential = idp.mint({"sub": "alice", "email": "alice@example.com", "roles": ["clerk"], "phone": "555"})
    answer = await harness.check("/reports/1", token=credential, headers={"x-identity-token": "forged"})
    assert answer.allowed
    token = answer.headers["x-identity-token"]
    assert token != "forged"
    assert "x-identity-token" not in answer.removed
    assert jwt.get_unverified_header(token) == {"alg": alg, "kid": f"{alg}-new", "typ": "JWT"}
    claims = await _verify(client, admin, token)
    exp = math.floor(jwt.decode(credential, options={"verify_signature": False})["exp"])
    assert claims == {
        "iss": admin,
        "aud": "orders-api",
        "sub": "alice",
        "iat": claims["iat"],
        "exp": min(claims["iat"] + 300, exp),
        "email": "alice@example.com",
        "roles": ["clerk"],
        "policy": "reports",
        "introspector": "idp",
    }
    assert abs(claims["iat"] - time.time()) < 5

    # HTTP mode's answer carries the same token (the minter's cache is shared by both protocols).
    assert harness.service.http is not None
    http = f"http://127.0.0.1:{harness.service.http.port}"
    async with client.get(http + "/ext_authz/reports/1", headers={"Authorization": f"Bearer {credential}"}) as response:
        assert response.status == 200
        assert response.headers["x-identity-token"] == token
        assert "x-identity-token" not in response.headers.get("x-envoy-auth-headers-to-remove", "")


async def test_a_client_sent_identity_token_never_reaches_the_upstream(
    idp: DevIdentityProvider, start_service: StartService, client: aiohttp.ClientSession
) -> None:
    port = free_port()
    anonymous = {"id": "public", "engine": "matcho", "matcho": {"uri": "#^/public/"}}
    keys = [{"kid": "k1", "alg": "ES256", "private_pem": PEMS["ES256"]}]
    harness = await start_service(_identity_config(idp, port, keys, policies=[*POLICIES, anonymous]))
    # An anonymous allow has no identity to vouch for: the client's copy is removed.
    answer = await harness.check("/public/a", headers={"x-identity-token": "forged"})
    assert answer.allowed
    assert "x-identity-token" not in answer.headers
    assert "x-identity-token" in answer.removed
    assert harness.service.http is not None
    http = f"http://127.0.0.1:{harness.service.http.port}"
    async with client.get(http + "/ext_authz/public/a", headers={"x-identity-token": "forged"}) as response:
        assert response.status == 200
        assert "x-identity-token" not in response.headers
        assert "x-identity-token" in response.headers["x-envoy-auth-headers-to-remove"].split(",")
    # An allow with an identity overwrites it (append: false, checked by the harness).
    answer = await harness.check("/reports/1", token=idp.mint({"sub": "alice"}), headers={"x-identity-token": "forged"})
    assert answer.headers["x-identity-token"] != "forged"


async def test_the_identity_token_is_cached_until_half_its_life_and_never_outlives_the_credential(
    idp: DevIdentityProvider, start_service: StartService, client: aiohttp.ClientSession
) -> None:
    port = free_port()
    keys = [{"kid": "k1", "alg": "ES256", "private_pem": PEMS["ES256"]}]
    harness = await start_service(_identity_config(idp, port, keys, authentication_only=True))
    credential = idp.mint({"sub": "bob", "email": "bob@example.com"}, ttl=5)
    first = await harness.check("/a", token=credential)
    minted_by = time.time()
    second = await harness.check("/b", token=credential)
    token = first.headers["x-identity-token"]
    assert second.headers["x-identity-token"] == token  # a cache hit: the same string, not a new signature
    other = await harness.check("/a", token=idp.mint({"sub": "carol"}))
    assert other.headers["x-identity-token"] != token

    claims = await _verify(client, f"http://127.0.0.1:{port}", token)
    credential_exp = jwt.decode(credential, options={"verify_signature": False})["exp"]
    assert claims["exp"] == math.floor(credential_exp)  # capped by the credential, not iat + 300
    assert "policy" not in claims  # authentication-only: no policy decided
    assert claims["email"] == "bob@example.com"  # listed claims are kept without policies too
    # Past half its life the token is minted again (ES256 signatures differ even for one payload).
    await sleep_past(minted_by + (claims["exp"] - claims["iat"]) / 2)
    again = await harness.check("/a", token=credential)
    assert again.allowed
    assert again.headers["x-identity-token"] != token
    renewed = jwt.decode(again.headers["x-identity-token"], options={"verify_signature": False})
    assert renewed["exp"] <= math.floor(credential_exp)
    await sleep_past(claims["exp"], margin=0.1)
    with pytest.raises(jwt.ExpiredSignatureError):
        await _verify(client, f"http://127.0.0.1:{port}", token)


async def test_well_known_documents_are_404_without_an_identity_token(
    idp: DevIdentityProvider, start_service: StartService, client: aiohttp.ClientSession
) -> None:
    port = free_port()
    await start_service({"server": _server(port), "introspectors": [jwks_introspector(idp)]})
    for path in ("/.well-known/jwks.json", "/.well-known/openid-configuration"):
        async with client.get(f"http://127.0.0.1:{port}{path}") as response:
            assert response.status == 404


async def test_workers_publish_the_keys_on_the_supervisors_admin_listener_and_follow_a_reload(
    idp: DevIdentityProvider, spawn: Spawn, client: aiohttp.ClientSession
) -> None:
    admin_port = free_port()
    admin = f"http://127.0.0.1:{admin_port}"
    first = [{"kid": "k1", "alg": "ES256", "private_pem": PEMS["ES256"]}]
    config = _identity_config(idp, admin_port, first, authentication_only=True)
    settings = {"workers": 2, "admin_address": f"127.0.0.1:{admin_port}", "drain_delay": 0}
    spawned = await spawn({k: v for k, v in config.items() if k != "server"}, server=settings)
    await _workers_ready(client, admin)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{spawned.port}") as channel:
        answer = Answer.of(
            await AuthorizationClient(channel).Check(check_request("/a", token=idp.mint({"sub": "dan"})), timeout=10)
        )
    assert (await _verify(client, admin, answer.headers["x-identity-token"]))["sub"] == "dan"

    # Rotation, step one: the new key second (published, not signing), then SIGHUP.
    rotated = _identity_config(idp, admin_port, [*first, {"kid": "k2", "alg": "EdDSA", "private_pem": PEMS["EdDSA"]}])
    written = yaml.safe_load(spawned.path.read_text())
    written["response"] = rotated["response"]
    spawned.path.write_text(yaml.safe_dump(written))
    spawned.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while True:
        async with client.get(admin + "/.well-known/jwks.json") as response:
            kids = [key["kid"] for key in (await response.json())["keys"]]
        if kids == ["k1", "k2"]:
            break
        assert time.monotonic() < deadline, kids
        await asyncio.sleep(0.1)


async def _workers_ready(client: aiohttp.ClientSession, admin: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            async with client.get(admin + "/readyz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        assert time.monotonic() < deadline, "the supervisor never became ready"
        await asyncio.sleep(0.1)


async def test_a_failure_in_the_token_or_the_deny_answer_fails_closed(
    idp: DevIdentityProvider,
    start_service: StartService,
    client: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = free_port()
    keys = [{"kid": "k1", "alg": "ES256", "private_pem": PEMS["ES256"]}]
    config = _identity_config(idp, port, keys, authentication_only=True)
    config["responses"] = {"unauthenticated": {"headers": {"x-reason": "{reason}"}}}
    harness = await start_service(config)
    engine = harness.service.engine
    assert engine.minter is not None
    assert harness.service.http is not None
    http = f"http://127.0.0.1:{harness.service.http.port}"

    def explode(*args: object, **kwargs: object) -> Any:
        raise RuntimeError("signer down")

    monkeypatch.setattr(engine.minter, "token_for", explode)
    monkeypatch.setattr(engine.config.responses, "render", explode)
    credential = idp.mint({"sub": "frank"})
    allowed = await harness.check("/a", token=credential)
    assert (allowed.http_status, allowed.response.status.message) == (503, "internal_error")
    denied = await harness.check("/a")
    assert (denied.http_status, denied.response.status.message) == (503, "internal_error")
    async with client.get(http + "/ext_authz/a", headers={"Authorization": f"Bearer {credential}"}) as response:
        assert response.status == 503
        assert "x-identity-token" not in response.headers
    async with client.get(http + "/ext_authz/a") as response:
        assert response.status == 503
    monkeypatch.undo()
    assert (await harness.check("/a", token=credential)).allowed
    assert (await harness.check("/a")).headers["x-reason"] == "missing_token"
