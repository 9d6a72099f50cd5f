"""The last hostile findings of issue 16 (items 3, 5-9), end to end: the real grpc.aio service and
the real dev IdP, its key set and introspection answers shaped per test."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from jwt.algorithms import OKPAlgorithm, RSAAlgorithm

from authz_service.devstack.idp import DevIdentityProvider
from tests.conftest import StartService, jwks_introspector, opaque_introspector
from tests.harness import Answer


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(idp: DevIdentityProvider, **extra: Any) -> dict[str, Any]:
    now = time.time()
    return {"iss": idp.issuer, "sub": "user-1", "aud": "authz-service", "iat": now, "exp": now + 300, **extra}


def signed(private: Any, header: dict[str, Any], payload: dict[str, Any]) -> str:
    """A compact JWS signed by hand: any `alg` name, any header (PyJWT knows no `Ed25519`)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(private.sign(signing_input.encode()))}"


def reason(answer: Answer) -> str:
    return str(answer.response.status.message)


def publish(monkeypatch: pytest.MonkeyPatch, idp: DevIdentityProvider, *extra: dict[str, Any]) -> None:
    """The IdP's key set plus these JWKs."""
    original = idp.jwks
    monkeypatch.setattr(idp, "jwks", lambda: {"keys": [*original()["keys"], *extra]})


# --------------------------------------------------------------------------- item 3: b64


async def test_a_b64_header_is_refused(idp: DevIdentityProvider, start_service: StartService) -> None:
    # Signed by hand with exactly these headers (PyJWT would drop `b64: true` and detach a `b64: false` payload).
    secret = idp.hmac_secret
    service = await start_service(
        {"introspectors": [{"id": "hs", "type": "jwt", "jwt": {"iss": idp.issuer, "secret": secret}}]}
    )
    for value in (False, True, "false"):
        answer = await service.check(token=idp.mint(alg="HS256", key=secret, headers={"b64": value}))
        assert (answer.http_status, reason(answer)) == (401, "malformed"), value
    answer = await service.check(token=idp.mint(alg="HS256", key=secret, headers={"b64": False, "crit": ["b64"]}))
    assert reason(answer) == "unsupported_crit"
    assert (await service.check(token=idp.mint(alg="HS256", key=secret))).allowed


# --------------------------------------------------------------------------- item 6: lifetime


async def test_max_lifetime_and_dates_past_the_year_9999(idp: DevIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp, jwt={"max_lifetime": 3600})]})
    now = time.time()
    assert (await service.check(token=idp.mint(ttl=3600))).allowed
    too_long = await service.check(token=idp.mint(ttl=7200))
    assert (too_long.http_status, reason(too_long)) == (401, "lifetime_too_long")
    assert too_long.body == {
        "error": "invalid_token",
        "error_description": "token lifetime exceeds the allowed maximum",
    }
    assert reason(await service.check(token=idp.mint({"iat": None}, ttl=7200))) == "lifetime_too_long"
    # An exp 26 digits long: not "never expires" but malformed claims, with or without max_lifetime.
    unlimited = await start_service({"introspectors": [jwks_introspector(idp)]})
    for answer in (
        await service.check(token=idp.mint({"exp": 10**25})),
        await unlimited.check(token=idp.mint({"exp": 10**25})),
        await unlimited.check(token=idp.mint({"nbf": now, "iat": 10**25})),
    ):
        assert (answer.http_status, reason(answer)) == (401, "bad_claims")
    assert (await unlimited.check(token=idp.mint(ttl=10 * 365 * 86400))).allowed  # no max_lifetime: no limit


# --------------------------------------------------------------------------- item 5: introspection Content-Type


@pytest.mark.parametrize("content_type", ["text/plain", "application/jsonp", "text/html"])
async def test_an_introspection_answer_not_labelled_json_is_a_503_and_not_cached(
    idp: DevIdentityProvider, start_service: StartService, content_type: str
) -> None:
    service = await start_service({"introspectors": [opaque_introspector(idp)]})
    token = idp.issue_opaque({"sub": "opaque-user"})
    idp.introspect_content_type = content_type
    for _ in range(2):
        answer = await service.check(token=token)
        assert (answer.code, answer.http_status, reason(answer)) == (14, 503, "idp_unavailable")
    assert idp.hits["introspect"] == 2  # never cached
    upstream = service.service.client.calls
    assert upstream[("introspection", "bad_content_type")] == 2
    idp.introspect_content_type = "application/json"
    assert (await service.check(token=token)).allowed
    assert (await service.check(token=token)).allowed
    assert idp.hits["introspect"] == 3  # the good answer is cached


# --------------------------------------------------------------------------- items 7-9: keys


def _short_coordinate_p521() -> tuple[ec.EllipticCurvePrivateKey, dict[str, Any]]:
    """A P-521 key with a coordinate under 66 bytes, as authlib publishes it (half of all keys qualify)."""
    for _ in range(200):
        private = ec.generate_private_key(ec.SECP521R1())
        numbers = private.public_key().public_numbers()
        if min(numbers.x, numbers.y).bit_length() <= 8 * 65:
            x, y = (v.to_bytes((v.bit_length() + 7) // 8, "big") for v in (numbers.x, numbers.y))
            return private, {"kty": "EC", "crv": "P-521", "x": b64(x), "y": b64(y), "kid": "short", "alg": "ES512"}
    pytest.fail("no short-coordinate P-521 key in 200 tries")


async def test_an_authlib_style_ec_key_verifies_and_a_weak_rsa_key_is_skipped_with_a_reason(
    idp: DevIdentityProvider,
    start_service: StartService,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    short_private, short_jwk = await asyncio.to_thread(_short_coordinate_p521)
    weak_private = await asyncio.to_thread(rsa.generate_private_key, 65537, 1024)
    weak_jwk = {**RSAAlgorithm.to_jwk(weak_private.public_key(), as_dict=True), "kid": "weak", "alg": "RS256"}
    publish(monkeypatch, idp, short_jwk, weak_jwk)
    caplog.set_level(logging.WARNING, logger="authz_service.tokens.jwks")
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    token = pyjwt.encode(claims(idp), short_private, algorithm="ES512", headers={"kid": "short"})
    assert (await service.check(token=token)).allowed
    # Signed by hand: PyJWT warns about (and the suite turns warnings into errors for) 1024-bit keys.
    weak_input = f"{b64(json.dumps({'alg': 'RS256', 'kid': 'weak'}).encode())}.{b64(json.dumps(claims(idp)).encode())}"
    weak_signature = weak_private.sign(weak_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    weak_token = f"{weak_input}.{b64(weak_signature)}"
    answer = await service.check(token=weak_token)
    assert (answer.http_status, reason(answer)) == (401, "unknown_key")
    [record] = [r for r in caplog.records if r.getMessage() == "JWKS key skipped"]
    assert record.fields == {"introspector": "idp", "kid": "weak", "reason": "weak_rsa_key"}  # type: ignore[attr-defined]
    assert weak_jwk["n"][:24] not in caplog.text  # the key itself is never logged


async def test_the_fully_specified_ed25519_alg(
    idp: DevIdentityProvider, start_service: StartService, monkeypatch: pytest.MonkeyPatch
) -> None:
    ed = ed25519.Ed25519PrivateKey.generate()
    ed4 = ed448.Ed448PrivateKey.generate()
    publish(
        monkeypatch,
        idp,
        {**OKPAlgorithm.to_jwk(ed.public_key(), as_dict=True), "kid": "ed", "alg": "Ed25519"},
        {**OKPAlgorithm.to_jwk(ed4.public_key(), as_dict=True), "kid": "ed448", "alg": "Ed25519"},  # skipped
    )
    pem = ed.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    static = {
        "id": "static",
        "type": "jwt",
        "jwt": {"iss": "https://static.example", "keys": [{"kty": "OKP", "alg": "Ed25519", "pub": pem.decode()}]},
    }
    service = await start_service({"introspectors": [jwks_introspector(idp), static]})
    assert (await service.check(token=signed(ed, {"alg": "Ed25519", "kid": "ed"}, claims(idp)))).allowed
    static_token = signed(ed, {"alg": "Ed25519"}, {**claims(idp), "iss": "https://static.example"})
    assert (await service.check(token=static_token)).allowed
    # The JWK names Ed25519: no key of that kid verifies the polymorphic EdDSA name.
    assert reason(await service.check(token=signed(ed, {"alg": "EdDSA", "kid": "ed"}, claims(idp)))) == "unknown_key"
    # An Ed448 key published as Ed25519 is never used.
    ed448_token = signed(ed4, {"alg": "Ed25519", "kid": "ed448"}, claims(idp))
    assert reason(await service.check(token=ed448_token)) == "unknown_key"
