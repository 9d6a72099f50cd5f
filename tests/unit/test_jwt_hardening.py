"""jwt: the last hostile findings of issue 16 (items 2, 3 and 6), on fake clocks and a fake IdP client.

- An alg no key could ever verify (`none`, `None`, a JWE alg, a typo) is a 401 before any key
  lookup, whatever the key source: no JWKS or discovery fetch, even with an unknown kid.
- Any `b64` header (RFC 7797 unencoded payloads) is refused.
- `jwt.max_lifetime` bounds exp - iat (or exp - now without iat), as Envoy jwt_authn's.
- `exp`, `nbf` and `iat` past the year 9999 are malformed claims, so no token "never expires".
"""

from __future__ import annotations

from typing import Any

import pytest

from authz_service.config.model import JwtIntrospectorConfig
from authz_service.config.validate import validate_config
from authz_service.errors import ConfigError, TokenRejected
from authz_service.model import Reason
from authz_service.tokens.base import Credential
from authz_service.tokens.discovery import OidcDiscovery
from authz_service.tokens.jwks import JwksKeySource
from authz_service.tokens.jwt import (
    MAX_NUMERIC_DATE,
    JwtIntrospector,
    KeySource,
    StaticKeySource,
    check_claims,
    parse_jwt,
)
from tests.unit.fakes import EPOCH, EcSigner, FakeClock, FakeIdpClient, compact, hs_token, jwks

ISS = "https://idp.example"
SECRET = b"an-hmac-secret-of-at-least-32-bytes!"
SIGNER = EcSigner("k1")
NOW = EPOCH
HOUR = 3600


def jwt_config(top: dict[str, Any] | None = None, **jwt: Any) -> JwtIntrospectorConfig:
    resource = {"id": "idp", "type": "jwt", **(top or {}), "jwt": {"iss": ISS, **jwt}}
    [config] = validate_config({"introspectors": [resource]}, None).introspectors
    assert isinstance(config, JwtIntrospectorConfig)
    return config


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"iss": ISS, "sub": "user-1", "iat": NOW, "exp": NOW + 300}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


async def reason_of(introspector: JwtIntrospector, token: str) -> Reason:
    with pytest.raises(TokenRejected) as caught:
        await introspector.introspect(Credential(token))
    return caught.value.reason


def parse_reason(token: str) -> Reason:
    with pytest.raises(TokenRejected) as caught:
        parse_jwt(token)
    return caught.value.reason


# --------------------------------------------------------------------------- item 2: no key lookup for hopeless algs


class Sources:
    """One introspector per kind of key source; the JWKS and discovery ones count their fetches."""

    def __init__(self) -> None:
        self.idp = FakeIdpClient(jwks(SIGNER))
        self.idp.by_url[ISS + "/.well-known/openid-configuration"] = {"issuer": ISS, "jwks_uri": ISS + "/jwks"}
        clock = FakeClock(0.0)
        secret = jwt_config(secret=SECRET.decode())
        keys = jwt_config(keys=[{"kty": "EC", "alg": "ES256", "kid": "k1", "pub": SIGNER.public_pem()}])
        uri = jwt_config({"jwks_uri": ISS + "/jwks"})
        discovery = jwt_config({"discovery": True})
        static_secret = StaticKeySource.from_config(secret)
        static_keys = StaticKeySource.from_config(keys)
        assert static_secret is not None
        assert static_keys is not None
        sources: dict[str, tuple[JwtIntrospectorConfig, KeySource]] = {
            "secret": (secret, static_secret),
            "keys": (keys, static_keys),
            "jwks_uri": (uri, JwksKeySource(ISS + "/jwks", self.idp, ttl=300, clock=clock)),
            "discovery": (
                discovery,
                JwksKeySource(OidcDiscovery(ISS, self.idp, 2.0), self.idp, ttl=300, clock=clock),
            ),
        }
        self.introspectors = {
            name: JwtIntrospector(config, source, clock=FakeClock()) for name, (config, source) in sources.items()
        }


HOPELESS = ["none", "None", "NONE", "nOnE", "RSA-OAEP", "dir", "ES256K", "HS1", "rs256", " RS256", "EdDSA ", "ed25519"]


@pytest.mark.parametrize("alg", HOPELESS)
@pytest.mark.parametrize("kind", ["secret", "keys", "jwks_uri", "discovery"])
async def test_an_alg_no_key_could_verify_is_refused_before_any_key_lookup(kind: str, alg: str) -> None:
    s = Sources()
    for kid in (None, "k1", "unknown-kid"):
        header: dict[str, Any] = {"alg": alg} if kid is None else {"alg": alg, "kid": kid}
        token = compact(header, claims(), b"" if alg.lower() == "none" else b"sig")
        assert await reason_of(s.introspectors[kind], token) is Reason.BAD_ALGORITHM
    assert s.idp.calls == []  # not one JWKS or discovery fetch


async def test_hmac_against_a_jwks_source_is_refused_without_a_fetch() -> None:
    # HMAC is verifiable in general, but never with keys from a JWKS: that source refuses it first.
    s = Sources()
    token = hs_token(claims(), SECRET, kid="unknown-kid")
    assert await reason_of(s.introspectors["jwks_uri"], token) is Reason.BAD_ALGORITHM
    assert s.idp.calls == []


async def test_a_verifiable_alg_with_an_unknown_kid_still_refetches_once() -> None:
    # The counterpart: the early refusal is about the alg only, not about unknown kids in general.
    s = Sources()
    token = EcSigner("new").sign(claims())
    assert await reason_of(s.introspectors["jwks_uri"], token) is Reason.UNKNOWN_KEY
    assert len(s.idp.calls) == 2  # the cold fetch, then one unknown-kid refetch


# --------------------------------------------------------------------------- item 3: b64


@pytest.mark.parametrize("b64", [False, True, "false", None, 0])
def test_any_b64_header_is_refused(b64: Any) -> None:
    assert parse_reason(compact({"alg": "HS256", "b64": b64}, claims())) is Reason.MALFORMED
    assert parse_reason(hs_token(claims(), SECRET, b64=b64)) is Reason.MALFORMED


def test_b64_listed_in_crit_is_an_unsupported_extension() -> None:
    token = compact({"alg": "HS256", "b64": False, "crit": ["b64"]}, claims())
    assert parse_reason(token) is Reason.UNSUPPORTED_CRIT


async def test_a_validly_signed_b64_false_token_is_refused() -> None:
    # Signed over the raw payload as RFC 7797 would, without crit: a verifier ignoring b64 would
    # check the signature over the base64url text instead and could be made to accept another payload.
    config = jwt_config(secret=SECRET.decode())
    source = StaticKeySource.from_config(config)
    assert source is not None
    introspector = JwtIntrospector(config, source, clock=FakeClock())
    assert await reason_of(introspector, hs_token(claims(), SECRET, b64=False)) is Reason.MALFORMED
    assert (await introspector.introspect(Credential(hs_token(claims(), SECRET)))).user_id == "user-1"


# --------------------------------------------------------------------------- item 6: max_lifetime and year 9999


def lifetime_reason(token_claims: dict[str, Any], max_lifetime: float | None, leeway: float = 30) -> Reason | None:
    try:
        check_claims(token_claims, issuer=ISS, audiences=None, leeway=leeway, now=NOW, max_lifetime=max_lifetime)
    except TokenRejected as err:
        return err.reason
    return None


@pytest.mark.parametrize(
    ("token_claims", "reason"),
    [
        (claims(iat=NOW, exp=NOW + HOUR), None),  # exactly max_lifetime
        (claims(iat=NOW, exp=NOW + HOUR + 1), Reason.LIFETIME_TOO_LONG),
        (claims(iat=NOW - HOUR, exp=NOW + 60), Reason.LIFETIME_TOO_LONG),  # lived long already: exp - iat counts
        (claims(iat=NOW - 600, exp=NOW + 2400), None),
        (claims(iat=None, exp=NOW + HOUR), None),
        (claims(iat=None, exp=NOW + HOUR + 30), None),  # exp - now, with the leeway for clock skew
        (claims(iat=None, exp=NOW + HOUR + 31), Reason.LIFETIME_TOO_LONG),
        (claims(iat=NOW, exp=10**11), Reason.LIFETIME_TOO_LONG),  # the year 5138: valid, but far too long
    ],
)
def test_max_lifetime(token_claims: dict[str, Any], reason: Reason | None) -> None:
    assert lifetime_reason(token_claims, HOUR) is reason


def test_no_max_lifetime_means_no_limit() -> None:
    assert lifetime_reason(claims(exp=MAX_NUMERIC_DATE), None) is None
    assert jwt_config(secret=SECRET.decode()).max_lifetime is None


@pytest.mark.parametrize(
    ("token_claims", "reason"),
    [
        (claims(exp=10**25), Reason.BAD_CLAIMS),  # 26 digits: "never expires"
        (claims(exp=MAX_NUMERIC_DATE + 1), Reason.BAD_CLAIMS),
        (claims(exp=float(MAX_NUMERIC_DATE) + 0.5), Reason.BAD_CLAIMS),
        (claims(exp=1e300), Reason.BAD_CLAIMS),
        (claims(nbf=10**25), Reason.BAD_CLAIMS),
        (claims(iat=10**25), Reason.BAD_CLAIMS),
        (claims(exp=MAX_NUMERIC_DATE), None),  # 9999-12-31T23:59:59Z is still a date
    ],
)
def test_numeric_dates_past_the_year_9999_are_malformed(token_claims: dict[str, Any], reason: Reason | None) -> None:
    assert lifetime_reason(token_claims, None) is reason


async def test_max_lifetime_is_enforced_by_the_introspector() -> None:
    config = jwt_config(secret=SECRET.decode(), max_lifetime=HOUR)
    assert config.max_lifetime == HOUR
    source = StaticKeySource.from_config(config)
    assert source is not None
    introspector = JwtIntrospector(config, source, clock=FakeClock())
    assert (await introspector.introspect(Credential(hs_token(claims(exp=NOW + HOUR), SECRET)))).user_id == "user-1"
    long_lived = hs_token(claims(exp=NOW + 2 * HOUR), SECRET)
    assert await reason_of(introspector, long_lived) is Reason.LIFETIME_TOO_LONG
    assert Reason.LIFETIME_TOO_LONG.label == "lifetime_too_long"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "introspector 'idp': jwt.max_lifetime must be between 1 and 315360000, got 0"),
        (-5, "introspector 'idp': jwt.max_lifetime must be between 1 and 315360000, got -5"),
        (10**10, "introspector 'idp': jwt.max_lifetime must be between 1 and 315360000, got 10000000000"),
        ("soon", "introspector 'idp': jwt.max_lifetime must be an integer, got"),
        (True, "introspector 'idp': jwt.max_lifetime must be an integer, got"),
        (1.5, "introspector 'idp': jwt.max_lifetime must be an integer, got"),
    ],
)
def test_max_lifetime_is_validated(value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        jwt_config(secret=SECRET.decode(), max_lifetime=value)
    [problem] = caught.value.problems
    assert str(problem).startswith(message), str(problem)


def test_max_lifetime_from_the_environment() -> None:
    resource = {"id": "idp", "type": "jwt", "jwt": {"iss": ISS, "secret": SECRET.decode(), "max_lifetime": "${MAX}"}}
    [config] = validate_config({"introspectors": [resource]}, {"MAX": "900"}).introspectors
    assert isinstance(config, JwtIntrospectorConfig)
    assert config.max_lifetime == 900
