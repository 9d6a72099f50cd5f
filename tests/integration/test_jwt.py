"""JWT introspectors end to end: a real grpc.aio service and a real aiohttp identity provider."""

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

from tests.conftest import StartService, jwks_introspector, new_idp
from tests.harness import Answer
from tests.hostile_idp import HostileIdentityProvider

LONG_SECRET = "s3cr3t-" * 10


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}.{_b64(signature)}"


def _claims(idp: HostileIdentityProvider, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": idp.issuer, "sub": "user-1", "aud": "authz-service", "iat": now, "exp": now + 300, **extra}


# --------------------------------------------------------------------------- key sources


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA", "PS256"])
async def test_jwks_key_source_allows_each_algorithm(
    idp: HostileIdentityProvider, start_service: StartService, alg: str, monkeypatch: pytest.MonkeyPatch
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


async def test_each_rejection_reason_is_a_401(idp: HostileIdentityProvider, start_service: StartService) -> None:
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
        # Sent as Bearer, without the client certificate (a DPoP-bound one gets a DPoP challenge:
        # tests/integration/test_sender_constrained.py).
        "bound to a client certificate": (
            idp.mint({"cnf": {"x5t#S256": "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"}}),
            ("no_client_certificate"),
        ),
        "a confirmation that cannot be checked": (
            idp.mint({"cnf": {"x5t#S256": "bwcK0esc3ACC3DB2Y5_lESsXE8o9"}}),
            ("bad_cnf"),
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


async def test_duplicate_claims_are_rejected(idp: HostileIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    header = _b64(json.dumps({"alg": "RS256", "kid": idp.kid()}).encode())
    raw = '{"iss": ' + json.dumps(idp.issuer) + ', "sub": "user-1", "sub": "admin", "exp": 9999999999}'
    payload = _b64(raw.encode())
    answer = await service.check(token=f"{header}.{payload}.{_b64(b'x' * 256)}")
    assert answer.http_status == 401
    assert answer.response.status.message == "malformed"


async def test_missing_token_and_other_schemes(idp: HostileIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    for headers in ({}, {"authorization": "Basic dXNlcjpwYXNz"}):
        answer = await service.check(headers=headers)
        assert (answer.code, answer.http_status) == (16, 401)
        assert answer.headers["www-authenticate"] == 'Bearer realm="authz-service"'
        assert answer.headers["content-type"] == "application/json"
        assert answer.body == {"error": "unauthorized", "error_description": "authentication required"}


async def test_bearer_scheme_is_case_insensitive(idp: HostileIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    for scheme in ("bearer", "BEARER", "Bearer"):
        answer = await service.check(headers={"authorization": f"{scheme} {idp.mint()}"})
        assert answer.allowed, scheme


async def test_two_authorization_values_are_400(idp: HostileIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    # curl -H "Authorization: Bearer A" -H "Authorization: Bearer B" (Envoy joins them with ",")
    answer = await service.check(headers={"authorization": f"Bearer {idp.mint()},Bearer {idp.mint()}"})
    assert (answer.code, answer.http_status) == (3, 400)
    assert answer.body["error"] == "invalid_request"
    assert 'error="invalid_request"' in answer.headers["www-authenticate"]


# --------------------------------------------------------------------------- answers


async def test_allow_answer_headers_and_user_id(idp: HostileIdentityProvider, start_service: StartService) -> None:
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


async def test_no_user_id_claim(idp: HostileIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    answer = await service.check(token=idp.mint({"sub": None}))
    assert answer.allowed
    assert "x-user-id" not in answer.headers
    assert "x-user-id" in answer.removed
    assert "user_id" not in answer.metadata


# --------------------------------------------------------------------------- JWKS caching


async def test_keys_are_cached(idp: HostileIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    assert idp.hits["jwks"] == 1  # warmed at start-up
    for _ in range(20):
        assert (await service.check(token=idp.mint())).allowed
    assert idp.hits["jwks"] == 1


async def test_rotation_refetches_once_and_drops_old_keys(
    idp: HostileIdentityProvider, start_service: StartService
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


async def test_unknown_kid_refetch_is_rate_limited(idp: HostileIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    answers = [await service.check(token=idp.mint(kid=f"bogus-{i}")) for i in range(30)]
    assert all(a.response.status.message == "unknown_key" for a in answers)
    assert idp.hits["jwks"] == 2  # start-up + one refetch for the whole flood


async def test_cached_keys_survive_an_outage(idp: HostileIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    await idp.go_offline()
    assert (await service.check(token=idp.mint())).allowed


async def test_cold_start_with_idp_down_is_503_then_recovers(
    idp: HostileIdentityProvider, start_service: StartService
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
    idp: HostileIdentityProvider, start_service: StartService
) -> None:
    strict = await start_service({"introspectors": [jwks_introspector(idp, cache_ttl=1)]})
    lenient = await start_service({"introspectors": [jwks_introspector(idp, cache_ttl=1, max_stale=600)]})
    await idp.go_offline()
    await asyncio.sleep(1.1)  # the behaviour under test: cache_ttl passing in real time
    assert (await strict.check(token=idp.mint())).http_status == 503
    answer = await lenient.check(token=idp.mint())
    assert answer.allowed
    source = lenient.service.engine.built["idp"].jwks
    assert source is not None
    assert source.stale_answers >= 1
    assert source.staleness() > 0


@pytest.mark.parametrize("mode", ["down", "html", "notjson", "redirect", "huge", "empty", "garbage_keys"])
async def test_broken_jwks_answers_are_503_not_allow(
    idp: HostileIdentityProvider, start_service: StartService, mode: str
) -> None:
    idp.jwks_mode = mode
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    answer = await service.check(token=idp.mint())
    assert (answer.code, answer.http_status) == (14, 503), mode
    assert idp.hits["jwks_redirected"] == 0  # redirects are never followed


async def test_slow_jwks_hits_the_timeout(idp: HostileIdentityProvider, start_service: StartService) -> None:
    idp.jwks_mode = "hang"
    started = time.monotonic()
    service = await start_service({"introspectors": [jwks_introspector(idp, timeout=0.3)]})
    answer = await service.check(token=idp.mint())
    assert answer.http_status == 503
    assert time.monotonic() - started < 2.0  # warm-up and the check each give up after 0.3 s


async def test_concurrent_cold_checks_make_one_fetch(idp: HostileIdentityProvider, start_service: StartService) -> None:
    await idp.go_offline()
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    await idp.go_online()
    idp.delay = 0.2  # keep the fetch in flight while all checks arrive
    before = idp.hits["jwks"]
    answers = await asyncio.gather(*(service.check(token=idp.mint()) for _ in range(50)))
    assert all(a.allowed for a in answers)
    assert idp.hits["jwks"] - before == 1


@pytest.mark.slow  # waits out the JWKS cache_ttl on the wall clock (clock-driven: tests/unit/test_jwks.py)
async def test_background_refresh_before_expiry(
    idp: HostileIdentityProvider, start_service: StartService, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp, cache_ttl=1)]})
    await asyncio.sleep(0.85)  # past 80% of the TTL
    idp.delay = 0.5
    answered = asyncio.Event()  # the IdP built a key set for the background refresh
    original = idp.jwks

    def jwks() -> dict[str, Any]:
        answered.set()
        return original()

    monkeypatch.setattr(idp, "jwks", jwks)
    started = time.monotonic()
    assert (await service.check(token=idp.mint())).allowed
    assert time.monotonic() - started < 0.4  # served from cache, refresh not awaited
    await asyncio.wait_for(answered.wait(), 5)
    assert idp.hits["jwks"] == 2


# --------------------------------------------------------------------------- issue 16's hostile findings
# (items 3, 6-9, formerly tests/integration/test_token_hardening.py)


def _claims_now(idp: HostileIdentityProvider, **extra: Any) -> dict[str, Any]:
    """As _claims, with the clock's fraction of a second in iat and exp."""
    now = time.time()
    return {"iss": idp.issuer, "sub": "user-1", "aud": "authz-service", "iat": now, "exp": now + 300, **extra}


def signed(private: Any, header: dict[str, Any], payload: dict[str, Any]) -> str:
    """A compact JWS signed by hand: any `alg` name, any header (PyJWT knows no `Ed25519`)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{_b64(private.sign(signing_input.encode()))}"


def reason(answer: Answer) -> str:
    return str(answer.response.status.message)


def publish(monkeypatch: pytest.MonkeyPatch, idp: HostileIdentityProvider, *extra: dict[str, Any]) -> None:
    """The IdP's key set plus these JWKs."""
    original = idp.jwks
    monkeypatch.setattr(idp, "jwks", lambda: {"keys": [*original()["keys"], *extra]})


# --------------------------------------------------------------------------- item 3: b64


async def test_a_b64_header_is_refused(idp: HostileIdentityProvider, start_service: StartService) -> None:
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


async def test_max_lifetime_and_dates_past_the_year_9999(
    idp: HostileIdentityProvider, start_service: StartService
) -> None:
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


# --------------------------------------------------------------------------- items 7-9: keys


def _short_coordinate_p521() -> tuple[ec.EllipticCurvePrivateKey, dict[str, Any]]:
    """A P-521 key with a coordinate under 66 bytes, as authlib publishes it (half of all keys qualify)."""
    for _ in range(200):
        private = ec.generate_private_key(ec.SECP521R1())
        numbers = private.public_key().public_numbers()
        if min(numbers.x, numbers.y).bit_length() <= 8 * 65:
            x, y = (v.to_bytes((v.bit_length() + 7) // 8, "big") for v in (numbers.x, numbers.y))
            return private, {"kty": "EC", "crv": "P-521", "x": _b64(x), "y": _b64(y), "kid": "short", "alg": "ES512"}
    pytest.fail("no short-coordinate P-521 key in 200 tries")


async def test_an_authlib_style_ec_key_verifies_and_a_weak_rsa_key_is_skipped_with_a_reason(
    idp: HostileIdentityProvider,
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
    token = pyjwt.encode(_claims_now(idp), short_private, algorithm="ES512", headers={"kid": "short"})
    assert (await service.check(token=token)).allowed
    # Signed by hand: PyJWT warns about (and the suite turns warnings into errors for) 1024-bit keys.
    weak_input = (
        f"{_b64(json.dumps({'alg': 'RS256', 'kid': 'weak'}).encode())}.{_b64(json.dumps(_claims_now(idp)).encode())}"
    )
    weak_signature = weak_private.sign(weak_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    weak_token = f"{weak_input}.{_b64(weak_signature)}"
    answer = await service.check(token=weak_token)
    assert (answer.http_status, reason(answer)) == (401, "unknown_key")
    [record] = [r for r in caplog.records if r.getMessage() == "JWKS key skipped"]
    assert record.fields == {"introspector": "idp", "kid": "weak", "reason": "weak_rsa_key"}  # type: ignore[attr-defined]
    assert weak_jwk["n"][:24] not in caplog.text  # the key itself is never logged


async def test_the_fully_specified_ed25519_alg(
    idp: HostileIdentityProvider, start_service: StartService, monkeypatch: pytest.MonkeyPatch
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
    assert (await service.check(token=signed(ed, {"alg": "Ed25519", "kid": "ed"}, _claims_now(idp)))).allowed
    static_token = signed(ed, {"alg": "Ed25519"}, {**_claims_now(idp), "iss": "https://static.example"})
    assert (await service.check(token=static_token)).allowed
    # The JWK names Ed25519: no key of that kid verifies the polymorphic EdDSA name.
    assert (
        reason(await service.check(token=signed(ed, {"alg": "EdDSA", "kid": "ed"}, _claims_now(idp)))) == "unknown_key"
    )
    # An Ed448 key published as Ed25519 is never used.
    ed448_token = signed(ed4, {"alg": "Ed25519", "kid": "ed448"}, _claims_now(idp))
    assert reason(await service.check(token=ed448_token)) == "unknown_key"
