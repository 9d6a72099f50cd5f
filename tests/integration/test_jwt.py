"""JWT introspectors end to end: a real grpc.aio service and a real aiohttp identity provider."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from authz_service.devstack.idp import DevIdentityProvider
from tests.conftest import StartService, jwks_introspector, new_idp

LONG_SECRET = "s3cr3t-" * 10


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}.{_b64(signature)}"


def _claims(idp: DevIdentityProvider, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": idp.issuer, "sub": "user-1", "aud": "authz-service", "iat": now, "exp": now + 300, **extra}


# --------------------------------------------------------------------------- key sources


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA", "PS256"])
async def test_jwks_key_source_allows_each_algorithm(
    idp: DevIdentityProvider, start_service: StartService, alg: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if alg == "PS256":
        # A JWK that names its alg is used for that alg only: publish the RSA key without one.
        idp_jwks = idp.jwks
        monkeypatch.setattr(
            idp, "jwks", lambda: {"keys": [{k: v for k, v in j.items() if k != "alg"} for j in idp_jwks()["keys"]]}
        )
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    # curl -H "Authorization: Bearer $TOKEN" http://api.example.com/
    answer = await service.check(token=idp.mint({"sub": "alice"}, alg=alg))
    assert answer.allowed, answer.response
    assert answer.headers["x-user-id"] == "alice"
    assert answer.claims()["sub"] == "alice"
    assert answer.metadata == {"user_id": "alice", "introspector": "idp"}


async def test_hmac_secret_key_source(start_service: StartService) -> None:
    service = await start_service(
        {"introspectors": [{"id": "hs", "type": "jwt", "jwt": {"iss": "https://hs.example", "secret": LONG_SECRET}}]}
    )
    provider = await new_idp(issuer="https://hs.example")
    provider.hmac_secret = LONG_SECRET
    for alg in ("HS256", "HS384", "HS512"):
        answer = await service.check(token=provider.mint({"aud": None}, alg=alg))
        assert answer.allowed, (alg, answer.body)
    wrong = await new_idp(issuer="https://hs.example")
    answer = await service.check(token=wrong.mint(alg="HS256"))
    assert answer.http_status == 401
    assert answer.response.status.message == "bad_signature"


def _pem(public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey) -> str:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


async def test_static_keys_rsa_ec_okp_and_oct(start_service: StartService) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP384R1())
    ed_key = ed25519.Ed25519PrivateKey.generate()
    iss = "https://static.example"
    service = await start_service(
        {
            "introspectors": [
                {
                    "id": "static",
                    "type": "jwt",
                    "jwt": {
                        "iss": iss,
                        "keys": [
                            {"kty": "RSA", "alg": "RS512", "format": "PEM", "pub": _pem(rsa_key.public_key())},
                            {"kty": "EC", "alg": "ES384", "format": "PEM", "pub": _pem(ec_key.public_key())},
                            {"kty": "OKP", "alg": "EdDSA", "format": "PEM", "pub": _pem(ed_key.public_key())},
                            {"kty": "OCT", "alg": "HS256", "format": "plain", "k": LONG_SECRET},
                        ],
                    },
                }
            ]
        }
    )
    import jwt as pyjwt

    claims = {"iss": iss, "sub": "bob", "exp": int(time.time()) + 60}
    for key, alg in ((rsa_key, "RS512"), (ec_key, "ES384"), (ed_key, "EdDSA"), (LONG_SECRET, "HS256")):
        answer = await service.check(token=pyjwt.encode(claims, key, algorithm=alg))
        assert answer.allowed, (alg, answer.body)
        assert answer.headers["x-user-id"] == "bob"
    # The RSA key is configured for RS512 only: the same key signing RS256 is an alg not configured.
    answer = await service.check(token=pyjwt.encode(claims, rsa_key, algorithm="RS256"))
    assert answer.http_status == 401
    assert answer.response.status.message == "bad_algorithm"


# --------------------------------------------------------------------------- rejections


async def test_each_rejection_reason_is_a_401(idp: DevIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp, jwt={"leeway": 5})]})
    other = await new_idp(issuer=idp.issuer)  # same issuer, other keys
    good = idp.mint()
    head, payload, sig = good.split(".")
    tampered_claims = json.loads(base64.urlsafe_b64decode(payload + "==")) | {"sub": "admin"}
    now = int(time.time())
    cases = {
        "wrong key": (other.mint(kid=idp.kid("RS256")), "bad_signature"),
        "expired": (idp.mint({"exp": now - 60}), "expired"),
        "not yet valid": (idp.mint({"nbf": now + 600}), "not_yet_valid"),
        "issued in the future": (idp.mint({"iat": now + 600}), "issued_in_future"),
        "wrong iss": (idp.mint({"iss": "https://evil.example"}), "unknown_issuer"),
        "bound to a DPoP key": (
            idp.mint({"cnf": {"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}}),
            ("sender_constrained"),
        ),
        "bound to a client certificate": (
            idp.mint({"cnf": {"x5t#S256": "bwcK0esc3ACC3DB2Y5_lESsXE8o9"}}),
            ("sender_constrained"),
        ),
        "wrong aud": (idp.mint({"aud": "someone-else"}), "bad_audience"),
        "missing aud": (idp.mint({"aud": None}), "bad_audience"),
        "missing exp": (idp.mint({"exp": None}), "bad_claims"),
        "exp as string": (idp.mint({"exp": str(now + 60)}), "bad_claims"),
        "sub as object": (idp.mint({"sub": {"id": 1}}), "bad_claims"),
        "alg none": (_forge({"alg": "none", "kid": idp.kid()}, _claims(idp)), "bad_algorithm"),
        "alg none via idp": (idp.mint(alg="none"), "bad_algorithm"),
        "hmac with the rsa public key": (
            idp.mint(alg="HS256", key=idp.public_pem("RS256"), kid=idp.kid()),
            "bad_algorithm",
        ),
        "tampered payload": (f"{head}.{_b64(json.dumps(tampered_claims).encode())}.{sig}", "bad_signature"),
        "malformed": ("eyJhbGciOi.not-a-jwt", "malformed"),
        "bad base64": ("eyJ!!!.e30.abc", "malformed"),
        "crit header": (idp.mint(headers={"crit": ["exp"]}), "unsupported_crit"),
        "unknown kid": (idp.mint(kid="no-such-kid"), "unknown_key"),
        "too large": (idp.mint({"pad": "x" * 9000}), "too_large"),
    }
    for name, (token, reason) in cases.items():
        answer = await service.check(token=token)
        assert not answer.allowed, name
        assert (answer.code, answer.http_status, answer.response.status.message) == (16, 401, reason), name
        challenge = answer.headers["www-authenticate"]
        assert challenge.startswith('Bearer realm="authz-service", error="invalid_token", error_description="'), name
        assert answer.body["error"] == "invalid_token", name
        assert token not in json.dumps(answer.body), name
        assert token[:40] not in challenge, name


async def test_duplicate_claims_are_rejected(idp: DevIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    header = _b64(json.dumps({"alg": "RS256", "kid": idp.kid()}).encode())
    raw = '{"iss": ' + json.dumps(idp.issuer) + ', "sub": "user-1", "sub": "admin", "exp": 9999999999}'
    payload = _b64(raw.encode())
    answer = await service.check(token=f"{header}.{payload}.{_b64(b'x' * 256)}")
    assert answer.http_status == 401
    assert answer.response.status.message == "malformed"


async def test_missing_token_and_other_schemes(idp: DevIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    for headers in ({}, {"authorization": "Basic dXNlcjpwYXNz"}):
        answer = await service.check(headers=headers)
        assert (answer.code, answer.http_status) == (16, 401)
        assert answer.headers["www-authenticate"] == 'Bearer realm="authz-service"'
        assert answer.headers["content-type"] == "application/json"
        assert answer.body == {"error": "unauthorized", "error_description": "authentication required"}


async def test_bearer_scheme_is_case_insensitive(idp: DevIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    for scheme in ("bearer", "BEARER", "Bearer"):
        answer = await service.check(headers={"authorization": f"{scheme} {idp.mint()}"})
        assert answer.allowed, scheme


async def test_two_authorization_values_are_400(idp: DevIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    # curl -H "Authorization: Bearer A" -H "Authorization: Bearer B" (Envoy joins them with ",")
    answer = await service.check(headers={"authorization": f"Bearer {idp.mint()},Bearer {idp.mint()}"})
    assert (answer.code, answer.http_status) == (3, 400)
    assert answer.body["error"] == "invalid_request"
    assert 'error="invalid_request"' in answer.headers["www-authenticate"]


# --------------------------------------------------------------------------- answers


async def test_allow_answer_headers_and_user_id(idp: DevIdentityProvider, start_service: StartService) -> None:
    service = await start_service(
        {
            "introspectors": [jwks_introspector(idp)],
            "response": {"claim_headers": {"email": "x-user-email", "tenant": "x-tenant"}},
        }
    )
    answer = await service.check(token=idp.mint({"sub": "sub-1", "box_user": "box-1", "email": "a@b.c"}))
    assert answer.allowed
    assert answer.headers["x-user-id"] == "box-1"  # box_user wins over sub
    assert answer.headers["x-user-email"] == "a@b.c"
    assert answer.claims()["email"] == "a@b.c"
    # Identity headers we do not set are removed, so a client cannot smuggle them upstream.
    assert answer.removed == ["x-tenant"]
    assert answer.metadata["user_id"] == "box-1"

    answer = await service.check(token=idp.mint({"sub": "sub-2", "email": "evil\r\nx-user-id: admin"}))
    assert answer.allowed
    assert answer.headers["x-user-id"] == "sub-2"
    assert "x-user-email" not in answer.headers
    assert "x-user-email" in answer.removed

    answer = await service.check(token=idp.mint({"sub": "admin\r\nx-injected: 1"}))
    assert answer.http_status == 401
    assert answer.response.status.message == "bad_claims"


async def test_no_user_id_claim(idp: DevIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    answer = await service.check(token=idp.mint({"sub": None}))
    assert answer.allowed
    assert "x-user-id" not in answer.headers
    assert "x-user-id" in answer.removed
    assert "user_id" not in answer.metadata


# --------------------------------------------------------------------------- JWKS caching


async def test_keys_are_cached(idp: DevIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    assert idp.hits["jwks"] == 1  # warmed at start-up
    for _ in range(20):
        assert (await service.check(token=idp.mint())).allowed
    assert idp.hits["jwks"] == 1


async def test_rotation_refetches_once_and_drops_old_keys(
    idp: DevIdentityProvider, start_service: StartService
) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    old_token = idp.mint()
    assert (await service.check(token=old_token)).allowed
    await asyncio.to_thread(idp.rotate, "RS256")  # a new RSA key: generated off the loop
    new_token = idp.mint()
    assert (await service.check(token=new_token)).allowed
    assert idp.hits["jwks"] == 2
    # The old key is gone from the JWKS now that we refetched it: its tokens no longer verify.
    answer = await service.check(token=old_token)
    assert answer.http_status == 401
    assert answer.response.status.message == "unknown_key"


async def test_unknown_kid_refetch_is_rate_limited(idp: DevIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    answers = [await service.check(token=idp.mint(kid=f"bogus-{i}")) for i in range(30)]
    assert all(a.response.status.message == "unknown_key" for a in answers)
    assert idp.hits["jwks"] == 2  # start-up + one refetch for the whole flood


async def test_cached_keys_survive_an_outage(idp: DevIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    await idp.go_offline()
    assert (await service.check(token=idp.mint())).allowed


async def test_cold_start_with_idp_down_is_503_then_recovers(
    idp: DevIdentityProvider, start_service: StartService
) -> None:
    await idp.go_offline()
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    answer = await service.check(token=idp.mint())
    assert (answer.code, answer.http_status) == (14, 503)
    assert answer.body["error"] == "temporarily_unavailable"
    await idp.go_online()
    assert (await service.check(token=idp.mint())).allowed


@pytest.mark.slow  # waits out the JWKS cache_ttl on the wall clock (clock-driven: tests/unit/test_jwks.py)
async def test_expired_keys_and_idp_down_is_503_unless_max_stale(
    idp: DevIdentityProvider, start_service: StartService
) -> None:
    strict = await start_service({"introspectors": [jwks_introspector(idp, cache_ttl=1)]})
    lenient = await start_service({"introspectors": [jwks_introspector(idp, cache_ttl=1, max_stale=600)]})
    await idp.go_offline()
    await asyncio.sleep(1.1)
    assert (await strict.check(token=idp.mint())).http_status == 503
    answer = await lenient.check(token=idp.mint())
    assert answer.allowed
    source = lenient.service.engine.built["idp"].jwks
    assert source is not None
    assert source.stale_answers >= 1
    assert source.staleness() > 0


@pytest.mark.parametrize("mode", ["down", "html", "notjson", "redirect", "huge", "empty", "garbage_keys"])
async def test_broken_jwks_answers_are_503_not_allow(
    idp: DevIdentityProvider, start_service: StartService, mode: str
) -> None:
    idp.jwks_mode = mode
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    answer = await service.check(token=idp.mint())
    assert (answer.code, answer.http_status) == (14, 503), mode
    assert idp.hits["jwks_redirected"] == 0  # redirects are never followed


async def test_slow_jwks_hits_the_timeout(idp: DevIdentityProvider, start_service: StartService) -> None:
    idp.jwks_mode = "hang"
    started = time.monotonic()
    service = await start_service({"introspectors": [jwks_introspector(idp, timeout=0.3)]})
    answer = await service.check(token=idp.mint())
    assert answer.http_status == 503
    assert time.monotonic() - started < 2.0  # warm-up and the check each give up after 0.3 s


async def test_concurrent_cold_checks_make_one_fetch(idp: DevIdentityProvider, start_service: StartService) -> None:
    await idp.go_offline()
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    await idp.go_online()
    idp.delay = 0.2  # keep the fetch in flight while all checks arrive
    before = idp.hits["jwks"]
    answers = await asyncio.gather(*(service.check(token=idp.mint()) for _ in range(50)))
    assert all(a.allowed for a in answers)
    assert idp.hits["jwks"] - before == 1


@pytest.mark.slow  # waits out the JWKS cache_ttl on the wall clock (clock-driven: tests/unit/test_jwks.py)
async def test_background_refresh_before_expiry(idp: DevIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp, cache_ttl=1)]})
    await asyncio.sleep(0.85)  # past 80% of the TTL
    idp.delay = 0.5
    started = time.monotonic()
    assert (await service.check(token=idp.mint())).allowed
    assert time.monotonic() - started < 0.4  # served from cache, refresh not awaited
    await asyncio.sleep(0.7)
    assert idp.hits["jwks"] == 2
