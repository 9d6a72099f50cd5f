"""Tests for the development identity provider (and the tests' hostile one), against their real HTTP servers."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import ec

from authz_service.devstack.idp import DevIdentityProvider
from tests.hostile_idp import HostileIdentityProvider

REPO_ROOT = Path(__file__).resolve().parents[2]
SHORT = aiohttp.ClientTimeout(total=0.2)


@pytest_asyncio.fixture
async def idp() -> AsyncIterator[DevIdentityProvider]:
    """A running provider on an ephemeral port."""
    async with DevIdentityProvider() as provider:
        yield provider


@pytest_asyncio.fixture
async def hostile() -> AsyncIterator[HostileIdentityProvider]:
    """The tests' identity provider, with failure modes, on an ephemeral port."""
    async with HostileIdentityProvider() as provider:
        yield provider


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session with a generous default timeout."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


async def fetch_jwks(http: aiohttp.ClientSession, idp: DevIdentityProvider) -> dict[str, Any]:
    """GET the JWKS document over HTTP."""
    async with http.get(idp.jwks_uri) as resp:
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        return body


async def introspect(
    http: aiohttp.ClientSession,
    idp: DevIdentityProvider,
    token: str | None,
    *,
    auth: str | None = "default",
) -> tuple[int, Any]:
    """POST a token to the introspection endpoint; returns (status, json body)."""
    headers = {"Accept": "application/json"}
    if auth == "default":
        headers["Authorization"] = idp.introspection_authorization
    elif auth is not None:
        headers["Authorization"] = auth
    form = {} if token is None else {"token": token, "token_type_hint": "access_token"}
    async with http.post(idp.introspection_url, data=form, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


def verify_with_jwks(token: str, jwks: dict[str, Any], alg: str, idp: DevIdentityProvider) -> dict[str, Any]:
    """Verify a token with the JWKS key its kid names."""
    kid = jwt.get_unverified_header(token)["kid"]
    (jwk,) = [key for key in jwks["keys"] if key["kid"] == kid]
    claims: dict[str, Any] = jwt.decode(
        token, jwt.PyJWK(jwk, algorithm=alg), algorithms=[alg], audience="authz-service", issuer=idp.issuer
    )
    return claims


# -- tokens and keys -------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
async def test_minted_tokens_verify_with_served_jwks(
    idp: DevIdentityProvider, http: aiohttp.ClientSession, alg: str
) -> None:
    token = idp.mint({"scope": "read"}, alg=alg)
    claims = verify_with_jwks(token, await fetch_jwks(http, idp), alg, idp)
    assert claims["sub"] == "user-1"
    assert claims["scope"] == "read"
    assert claims["iss"] == idp.issuer == idp.url
    assert claims["exp"] == claims["iat"] + 300  # the same float sum mint() computed: exact
    assert claims["jti"]
    assert jwt.get_unverified_header(token)["kid"] == idp.kid(alg)
    # The PEM export is the same key.
    jwt.decode(token, idp.public_pem(alg), algorithms=[alg], audience="authz-service")


def test_tokens_live_exactly_ttl_from_issue_not_from_the_whole_second() -> None:
    """exp is issue time + ttl, with the fraction: int(time.time()) + 1 made a 1 s token that could live 0.01 s."""
    provider = DevIdentityProvider(issuer="https://idp.example")  # not started: mint() needs no server
    before = time.time()
    token = provider.mint(ttl=1)
    opaque = provider.issue_opaque(ttl=1)
    after = time.time()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert before <= claims["iat"] <= after
    assert claims["exp"] == claims["iat"] + 1
    result = provider.introspect(opaque)
    assert result["active"] is True
    assert before <= result["iat"] <= after
    assert result["exp"] == result["iat"] + 1


@pytest.mark.asyncio
async def test_jwks_document_shape(idp: DevIdentityProvider, http: aiohttp.ClientSession) -> None:
    async with http.get(idp.jwks_uri) as resp:
        assert resp.content_type == "application/json"
        assert resp.headers["Cache-Control"] == "max-age=300"
        keys = {key["kty"]: key for key in (await resp.json())["keys"]}
    assert set(keys) == {"RSA", "EC", "OKP"}
    assert keys["RSA"]["alg"] == "RS256"
    assert {"n", "e"} <= keys["RSA"].keys()
    assert keys["EC"]["crv"] == "P-256"
    assert {"x", "y"} <= keys["EC"].keys()
    assert keys["OKP"]["crv"] == "Ed25519"
    assert "x" in keys["OKP"]
    assert all(key["use"] == "sig" and "d" not in key for key in keys.values())


def test_hs256_and_ps256_tokens() -> None:
    provider = DevIdentityProvider(issuer="https://issuer.example")
    assert len(provider.hmac_secret) >= 32
    hs = provider.mint(alg="HS256")
    assert "kid" not in jwt.get_unverified_header(hs)
    claims = jwt.decode(hs, provider.hmac_secret, algorithms=["HS256"], audience="authz-service")
    assert claims["iss"] == "https://issuer.example"
    ps = provider.mint(alg="PS256")
    jwt.decode(ps, provider.public_pem("PS256"), algorithms=["PS256"], audience="authz-service")


def test_mint_claim_and_kid_overrides() -> None:
    provider = DevIdentityProvider(issuer="iss")
    token = provider.mint({"exp": None, "aud": ["a", "b"], "sub": "alice"}, kid=None)
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "RS256", "typ": "JWT"}
    claims = jwt.decode(token, options={"verify_signature": False})
    assert "exp" not in claims
    assert claims["aud"] == ["a", "b"]
    assert claims["sub"] == "alice"

    assert jwt.get_unverified_header(provider.mint(kid="nope"))["kid"] == "nope"
    expired = provider.mint(ttl=-60)
    with pytest.raises(jwt.ExpiredSignatureError):
        jwt.decode(expired, provider.public_pem("RS256"), algorithms=["RS256"], audience="authz-service")


def test_mint_with_foreign_key_keeps_kid_but_fails_verification() -> None:
    provider = DevIdentityProvider(issuer="i")
    forged = provider.mint(alg="ES256", key=ec.generate_private_key(ec.SECP256R1()))
    assert jwt.get_unverified_header(forged)["kid"] == provider.kid("ES256")
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(forged, provider.public_pem("ES256"), algorithms=["ES256"], audience="authz-service")
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(
            provider.mint(alg="HS256", key="x" * 40),
            provider.hmac_secret,
            algorithms=["HS256"],
            audience="authz-service",
        )


def test_the_dev_idp_mints_no_hostile_token() -> None:
    """The wheel's IdP signs with real keys only: no `alg: none`, no PEM as an HMAC secret."""
    provider = DevIdentityProvider(issuer="i")
    with pytest.raises(ValueError, match="unsupported alg 'none'"):
        provider.mint(alg="none")
    with pytest.raises(jwt.InvalidKeyError):
        provider.mint(alg="HS256", key=provider.public_pem("RS256"))
    assert not any(name.endswith("_mode") for name in vars(provider))


def test_hostile_mint_header_overrides() -> None:
    provider = HostileIdentityProvider(issuer="iss")
    token = provider.mint(kid=None, headers={"typ": "at+jwt", "jku": "https://attacker.example"})
    assert jwt.get_unverified_header(token) == {"alg": "RS256", "typ": "at+jwt", "jku": "https://attacker.example"}
    jwt.decode(token, provider.public_pem("RS256"), algorithms=["RS256"], audience="authz-service")


def test_hostile_mint_alg_confusion_and_none() -> None:
    provider = HostileIdentityProvider(issuer="i")
    pem = provider.public_pem("RS256")
    confused = provider.mint(alg="HS256", key=pem)
    signing_input, _, signature = confused.rpartition(".")
    expected = hmac.new(pem.encode(), signing_input.encode(), hashlib.sha256).digest()
    assert base64.urlsafe_b64decode(signature + "==") == expected
    assert jwt.get_unverified_header(confused)["alg"] == "HS256"

    unsigned = provider.mint(alg="none")
    assert unsigned.endswith(".")
    assert jwt.get_unverified_header(unsigned)["alg"] == "none"
    with pytest.raises(ValueError, match="unsupported alg 'ES512'"):
        provider.mint(alg="ES512")


@pytest.mark.asyncio
async def test_rotation_drops_old_key_unless_kept(idp: DevIdentityProvider, http: aiohttp.ClientSession) -> None:
    old_token = idp.mint()
    old_kid = idp.kid()
    new_kid = idp.rotate("RS256")
    assert new_kid != old_kid == jwt.get_unverified_header(old_token)["kid"]
    kids = {key["kid"] for key in (await fetch_jwks(http, idp))["keys"]}
    assert new_kid in kids
    assert old_kid not in kids
    verify_with_jwks(idp.mint(), await fetch_jwks(http, idp), "RS256", idp)

    kept_token = idp.mint(alg="ES256")
    kept_kid = idp.kid("ES256")
    assert idp.rotate("ES256", keep_old=True) != kept_kid
    jwks = await fetch_jwks(http, idp)
    assert len([key for key in jwks["keys"] if key["kty"] == "EC"]) == 2
    verify_with_jwks(kept_token, jwks, "ES256", idp)
    verify_with_jwks(idp.mint(alg="ES256"), jwks, "ES256", idp)


# -- introspection ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_introspection_lifecycle(idp: DevIdentityProvider, http: aiohttp.ClientSession) -> None:
    token = idp.issue_opaque({"scope": "openid admin", "sub": "bob"})
    status, body = await introspect(http, idp, token)
    assert status == 200
    assert body["active"] is True
    assert body["sub"] == "bob"
    assert body["scope"] == "openid admin"
    assert body["client_id"] == "authz-service"
    assert body["iss"] == idp.issuer
    assert body["token_type"] == "Bearer"

    assert await introspect(http, idp, "unknown") == (200, {"active": False})
    idp.revoke(token)
    assert await introspect(http, idp, token) == (200, {"active": False})
    assert await introspect(http, idp, idp.issue_opaque(ttl=-1)) == (200, {"active": False})
    assert idp.hits["introspect"] == 4


@pytest.mark.asyncio
async def test_introspection_requires_basic_auth_and_token(
    idp: DevIdentityProvider, http: aiohttp.ClientSession
) -> None:
    token = idp.issue_opaque()
    assert idp.introspection_authorization == "Basic " + base64.b64encode(b"authz-service:demo-secret").decode()
    assert await introspect(http, idp, token, auth=None) == (401, {"error": "invalid_client"})
    wrong = "Basic " + base64.b64encode(b"authz-service:nope").decode()
    assert await introspect(http, idp, token, auth=wrong) == (401, {"error": "invalid_client"})
    status, _ = await introspect(http, idp, None)
    assert status == 400
    async with http.get(idp.introspection_url) as resp:
        assert resp.status == 405


@pytest.mark.asyncio
async def test_introspection_client_auth_is_checked_as_rfc_6749_says() -> None:
    # client_secret_basic: base64(urlencode(id) ":" urlencode(secret)); client_secret_post: the form.
    client_id, secret = "svc:1+ a", "p%s:s+ w"
    provider = await asyncio.to_thread(DevIdentityProvider, None, "127.0.0.1", 0, client_id, secret)
    async with provider, aiohttp.ClientSession() as http:
        token = provider.issue_opaque()
        encoded = "Basic " + base64.b64encode(b"svc%3A1%2B+a:p%25s%3As%2B+w").decode()
        assert provider.introspection_authorization == encoded
        assert (await introspect(http, provider, token))[0] == 200
        assert provider.last_client_auth == "client_secret_basic"
        raw = "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()  # not form-urlencoded
        assert await introspect(http, provider, token, auth=raw) == (401, {"error": "invalid_client"})

        async def post(form: dict[str, str], headers: dict[str, str] | None = None) -> int:
            async with http.post(provider.introspection_url, data={"token": token, **form}, headers=headers) as resp:
                return resp.status

        assert await post({"client_id": client_id, "client_secret": secret}) == 200
        assert provider.last_client_auth == "client_secret_post"
        assert await post({"client_id": client_id, "client_secret": "wrong"}) == 401
        assert await post({"client_id": client_id}) == 401
        # Two methods in one request (RFC 6749 2.3: MUST NOT), even both right: refused.
        both = {"Authorization": provider.introspection_authorization}
        assert await post({"client_id": client_id, "client_secret": secret}, both) == 401
        assert await post({}, {"Authorization": "Bearer " + token}) == 401
        assert await post({}, {"Authorization": "Basic !!!"}) == 401
        provider.client_auth_methods = frozenset({"client_secret_post"})
        assert (await introspect(http, provider, token))[0] == 401  # basic no longer taken
        assert await post({"client_id": client_id, "client_secret": secret}) == 200
        assert provider.hits["introspect_client_refused"] == 7


@pytest.mark.asyncio
async def test_the_dev_idp_has_no_failure_modes(idp: DevIdentityProvider, http: aiohttp.ClientSession) -> None:
    for path in ("/moved/jwks.json", "/moved/introspect", "/moved/openid-configuration"):
        async with http.get(idp.url + path) as resp:
            assert resp.status == 404
    async with http.get(idp.discovery_url) as resp:
        assert await resp.json() == idp.discovery()


@pytest.mark.asyncio
async def test_hostile_idp_records_the_last_introspection(
    hostile: HostileIdentityProvider, http: aiohttp.ClientSession
) -> None:
    token = hostile.issue_opaque()
    assert (await introspect(http, hostile, token))[0] == 200
    assert hostile.last_introspection is not None
    assert hostile.last_introspection["form"] == {"token": token, "token_type_hint": "access_token"}
    assert hostile.last_introspection["headers"]["Accept"] == "application/json"


@pytest.mark.asyncio
async def test_introspection_oauth_error_modes(hostile: HostileIdentityProvider, http: aiohttp.ClientSession) -> None:
    idp = hostile
    token = idp.issue_opaque()
    for mode in ("invalid_token", "unsupported_token_type", "invalid_request"):
        idp.introspect_mode = mode
        assert await introspect(http, idp, token) == (400, {"error": mode})
    idp.introspect_mode = "invalid_token"
    assert (await introspect(http, idp, token, auth=None))[0] == 401  # client auth comes first


@pytest.mark.asyncio
async def test_keys_can_be_published_without_kid(idp: DevIdentityProvider, http: aiohttp.ClientSession) -> None:
    idp.publish_kids = False
    keys = (await fetch_jwks(http, idp))["keys"]
    assert keys
    assert all("kid" not in key for key in keys)
    assert jwt.get_unverified_header(idp.mint())["kid"] == idp.kid("RS256")  # tokens still name one


# -- failure modes ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_jwks_modes(hostile: HostileIdentityProvider, http: aiohttp.ClientSession) -> None:
    idp = hostile

    async def get(mode: str) -> tuple[int, str, bytes]:
        idp.jwks_mode = mode
        async with http.get(idp.jwks_uri, allow_redirects=False) as resp:
            return resp.status, resp.content_type, await resp.read()

    assert (await get("down"))[0] == 503
    status, ctype, body = await get("html")
    assert (status, ctype) == (200, "text/html")
    assert body.startswith(b"<!doctype html>")
    status, _, body = await get("notjson")
    assert status == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(body)
    status, _, body = await get("huge")
    assert status == 200
    assert len(body) >= 2 * 1024 * 1024
    assert json.loads(body)["keys"]
    assert json.loads((await get("empty"))[2]) == {"keys": []}
    assert json.loads((await get("garbage_keys"))[2]) == {"keys": [{"kty": "RSA"}]}

    idp.jwks_mode = "redirect"
    async with http.get(idp.jwks_uri, allow_redirects=False) as resp:
        assert resp.status == 302
        location = resp.headers["Location"]
    async with http.get(idp.url + location) as resp:
        assert (await resp.json()) == idp.jwks()
    assert idp.hits["jwks"] == 7
    assert idp.hits["jwks_redirected"] == 1

    idp.jwks_mode = "hang"
    with pytest.raises(asyncio.TimeoutError):
        async with http.get(idp.jwks_uri, timeout=SHORT):
            pass
    assert idp.hits["jwks"] == 8


@pytest.mark.asyncio
async def test_introspect_modes(hostile: HostileIdentityProvider, http: aiohttp.ClientSession) -> None:
    idp = hostile
    token = idp.issue_opaque()

    async def post(mode: str) -> tuple[int, str, bytes]:
        idp.introspect_mode = mode
        headers = {"Authorization": idp.introspection_authorization}
        async with http.post(
            idp.introspection_url, data={"token": token}, headers=headers, allow_redirects=False
        ) as resp:
            return resp.status, resp.content_type, await resp.read()

    assert (await post("down"))[0] == 503
    assert (await post("html"))[:2] == (200, "text/html")
    with pytest.raises(json.JSONDecodeError):
        json.loads((await post("notjson"))[2])
    no_active = json.loads((await post("no_active"))[2])
    assert "active" not in no_active
    assert no_active["sub"] == "user-1"
    assert json.loads((await post("active_string"))[2])["active"] == "true"
    status, _, body = await post("error500")
    assert status == 500
    assert json.loads(body) == {"error": "server_error"}
    status, _, body = await post("huge")
    assert status == 200
    assert len(body) >= 128 * 1024
    assert json.loads(body)["active"] is True
    status, _, _ = await post("redirect")
    assert status == 302
    assert idp.hits["introspect"] == 8
    assert idp.hits["introspect_redirected"] == 0

    idp.introspect_mode = "hang"
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(idp.introspection_url, data={"token": token}, timeout=SHORT):
            pass
    assert idp.hits["introspect"] == 9


@pytest.mark.asyncio
async def test_delay_slows_every_answer_and_hits_count_first(
    idp: DevIdentityProvider, http: aiohttp.ClientSession
) -> None:
    idp.delay = 0.3
    with pytest.raises(asyncio.TimeoutError):
        async with http.get(idp.jwks_uri, timeout=aiohttp.ClientTimeout(total=0.1)):
            pass
    assert idp.hits["jwks"] == 1
    idp.delay = 0.15
    started = time.monotonic()
    await fetch_jwks(http, idp)
    assert time.monotonic() - started >= 0.15
    assert idp.hits["jwks"] == 2


@pytest.mark.asyncio
async def test_offline_refuses_connections_and_online_reuses_port(
    idp: DevIdentityProvider, http: aiohttp.ClientSession
) -> None:
    port, url = idp.port, idp.url
    await fetch_jwks(http, idp)  # leaves a keep-alive connection in the pool
    await idp.go_offline()
    with pytest.raises(aiohttp.ClientConnectorError) as refused:
        async with http.get(idp.jwks_uri):
            pass
    assert isinstance(refused.value.os_error, ConnectionRefusedError)
    await idp.go_online()
    assert (idp.port, idp.url) == (port, url)
    assert (await fetch_jwks(http, idp)) == idp.jwks()


@pytest.mark.asyncio
async def test_stop_is_prompt_with_a_hanging_request(hostile: HostileIdentityProvider) -> None:
    idp = hostile
    idp.jwks_mode = "hang"
    async with aiohttp.ClientSession() as session:
        pending = asyncio.create_task(session.get(idp.jwks_uri))
        while not idp.hits["jwks"]:  # noqa: ASYNC110  # the IdP has no event to await: poll its counter
            await asyncio.sleep(0.01)
        started = time.monotonic()
        await idp.stop()
        assert time.monotonic() - started < 1.0
        with pytest.raises(aiohttp.ClientError):
            await pending


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("module", "args", "keys"),
    [("authz_service.devstack.idp", [], 3), ("tests.hostile_idp", ["--jwks-mode", "empty"], 0)],
)
async def test_command_line_serves_until_sigterm(module: str, args: list[str], keys: int) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        "--port",
        "0",
        "--issuer",
        "https://x.example",
        *args,
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 10))
        assert ready["issuer"] == "https://x.example"
        assert ready["jwks_uri"] == ready["url"] + "/.well-known/jwks.json"
        assert ready["introspection_url"] == ready["url"] + "/introspect"
        async with aiohttp.ClientSession() as session, session.get(ready["jwks_uri"]) as resp:
            assert len((await resp.json())["keys"]) == keys
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_token_endpoint_mints_for_demo_users() -> None:
    import jwt as pyjwt

    async with DevIdentityProvider() as idp, aiohttp.ClientSession() as session:
        auth = {"Authorization": idp.introspection_authorization}
        form = {"sub": "alice", "roles": "admin,ops", "email": "a@example.com", "ttl": "60"}
        async with session.post(idp.url + "/token", data=form, headers=auth) as response:
            assert response.status == 200
            answer = await response.json()
        key = pyjwt.PyJWK(next(k for k in idp.jwks()["keys"] if k["kty"] == "EC"))
        claims = pyjwt.decode(answer["access_token"], key, algorithms=["ES256"], audience="authz-service")
        assert (claims["sub"], claims["roles"], claims["email"]) == ("alice", ["admin", "ops"], "a@example.com")
        assert answer["expires_in"] == 60
        assert claims["exp"] == claims["iat"] + 60
        async with session.post(idp.url + "/token", data={"type": "opaque", "sub": "carol"}, headers=auth) as response:
            opaque = (await response.json())["access_token"]
        assert idp.introspect(opaque)["sub"] == "carol"
        async with session.post(idp.url + "/token", data=form) as response:
            assert response.status == 401  # client credentials required
