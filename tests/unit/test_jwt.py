"""jwt: strict parsing, the key decides the algorithm, explicit claim checks, and how long a verification lasts."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from authz_service.config.model import JwtIntrospectorConfig
from authz_service.errors import ConfigError, TokenRejected
from authz_service.model import Confirmation, Reason
from authz_service.registries import validate_config
from authz_service.tokens.base import Credential
from authz_service.tokens.discovery import OidcDiscovery
from authz_service.tokens.jwks import JwksKeySource
from authz_service.tokens.jws import MAX_TOKEN_BYTES, looks_like_jwt, parse_jwt
from authz_service.tokens.jwt import (
    MAX_NUMERIC_DATE,
    JwtIntrospector,
    KeySource,
    StaticKeySource,
    check_claims,
    user_id_of,
)
from authz_service.tokens.keys import MAX_KID_LENGTH, VerificationKey
from tests.unit.fakes import EPOCH, EcSigner, FakeClock, FakeIdpClient, b64url, compact, hs_token, jwks

ISS = "https://idp.example"
SECRET = b"an-hmac-secret-of-at-least-32-bytes!"
NOW = EPOCH
SIGNER = EcSigner("ec-1")


def jwt_config(top: dict[str, Any] | None = None, **jwt: Any) -> JwtIntrospectorConfig:
    """A `type: jwt` TokenIntrospector (`top`: its fields beside `jwt`), validated as the service validates it."""
    resource = {"id": "idp", "type": "jwt", **(top or {}), "jwt": {"iss": ISS, **jwt}}
    [config] = validate_config({"introspectors": [resource]}, None).introspectors
    assert isinstance(config, JwtIntrospectorConfig)
    return config


HMAC = jwt_config(secret=SECRET.decode(), aud="api")
EC = jwt_config(keys=[{"kty": "EC", "alg": "ES256", "format": "PEM", "pub": SIGNER.public_pem()}])


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"iss": ISS, "sub": "user-1", "aud": "api", "iat": NOW, "exp": NOW + 300}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def introspector(config: JwtIntrospectorConfig = HMAC, clock: FakeClock | None = None) -> JwtIntrospector:
    source = StaticKeySource.from_config(config)
    assert source is not None
    return JwtIntrospector(config, source, clock=clock or FakeClock())


async def rejection(intro: JwtIntrospector, token: str) -> Reason:
    with pytest.raises(TokenRejected) as caught:
        await intro.introspect(Credential(token))
    return caught.value.reason


def parse_reason(token: str) -> Reason:
    with pytest.raises(TokenRejected) as caught:
        parse_jwt(token)
    return caught.value.reason


# --------------------------------------------------------------------------- parse_jwt


def test_parse_splits_and_decodes() -> None:
    token = hs_token(claims(), SECRET, kid="k1")
    parsed = parse_jwt(token)
    assert parsed.alg == "HS256"
    assert parsed.kid == "k1"
    assert parsed.issuer == ISS
    assert parsed.claims["sub"] == "user-1"
    assert parsed.signing_input == token.rpartition(".")[0].encode()
    assert b64url(parsed.signature) == token.rpartition(".")[2]


def test_too_large_is_rejected_before_any_decoding() -> None:
    assert parse_reason("x" * (MAX_TOKEN_BYTES + 1)) is Reason.TOO_LARGE
    assert parse_reason(hs_token(claims(pad="a" * MAX_TOKEN_BYTES), SECRET)) is Reason.TOO_LARGE


HEADER = {"alg": "HS256"}


@pytest.mark.parametrize(
    "token",
    [
        "only.two",
        "a.b.c.d",
        "..",
        compact(HEADER, claims()) + "=",  # padding is not base64url of a JWS
        compact(HEADER, claims()).replace(".", "+.", 1),  # '+' is base64, not base64url
        compact("not json", claims()),
        compact("[1, 2]", claims()),  # a header must be an object
        compact(HEADER, "[1, 2]"),  # so must the claims
        compact(HEADER, '{"sub": "alice", "sub": "admin"}'),  # duplicate claims: which one is true?
        compact(HEADER, '{"exp": NaN}'),  # an exp that never compares as past
        compact('{"alg": "HS256", "alg": "none"}', claims()),
        compact({}, claims()),  # no alg
        compact({"alg": ""}, claims()),
        compact({"alg": 256}, claims()),
        compact({"alg": "HS256", "kid": 7}, claims()),  # kid is a lookup key: a string
        compact({"alg": "HS256", "kid": "k" * (MAX_KID_LENGTH + 1)}, claims()),
        compact(HEADER, "[" * 40 + "]" * 40),  # nesting that later walks could not afford
        f"{b64url(b'{}')}.{b64url(bytes([0x7B, 0x22, 0xFF, 0x22, 0x7D]))}.c2ln",  # payload not UTF-8
    ],
)
def test_malformed_tokens(token: str) -> None:
    assert parse_reason(token) is Reason.MALFORMED


def test_unknown_crit_is_refused() -> None:
    assert parse_reason(compact({"alg": "HS256", "crit": ["exp"]}, claims())) is Reason.UNSUPPORTED_CRIT


def test_kid_up_to_the_cap_is_accepted() -> None:
    assert parse_jwt(compact({"alg": "HS256", "kid": "k" * MAX_KID_LENGTH}, claims())).kid == "k" * MAX_KID_LENGTH


def test_unsigned_token_parses_but_is_never_accepted() -> None:
    token = compact({"alg": "none"}, claims(), b"")
    assert parse_jwt(token).signature == b""


def test_looks_like_jwt() -> None:
    assert looks_like_jwt(hs_token(claims(), SECRET))
    assert not looks_like_jwt("2YotnFZFEjr1zCsicMWpAA")  # RFC 6749's opaque example
    assert not looks_like_jwt("a.b.c")


# --------------------------------------------------------------------------- user id


@pytest.mark.parametrize(
    ("token_claims", "fallbacks", "user_id"),
    [
        ({"box_user": "box-1", "sub": "sub-1"}, (), "box-1"),  # Aidbox's box_user wins
        ({"sub": "sub-1"}, (), "sub-1"),
        ({"box_user": "", "sub": "sub-1"}, (), "sub-1"),  # empty is absent
        ({"username": "alice"}, ("username",), "alice"),  # opaque: username after sub
        ({"username": "alice"}, (), None),
        ({"sub": 42}, (), None),
    ],
)
def test_user_id_of(token_claims: Mapping[str, Any], fallbacks: tuple[str, ...], user_id: str | None) -> None:
    assert user_id_of(token_claims, *fallbacks) == user_id


# --------------------------------------------------------------------------- check_claims


def checked(token_claims: Mapping[str, Any], audiences: frozenset[str] | None = frozenset({"api"})) -> None:
    check_claims(token_claims, issuer=ISS, audiences=audiences, leeway=30, now=NOW)


@pytest.mark.parametrize(
    ("token_claims", "reason"),
    [
        (claims(exp=None), Reason.BAD_CLAIMS),  # exp is required
        (claims(exp="2030-01-01"), Reason.BAD_CLAIMS),
        (claims(exp=True), Reason.BAD_CLAIMS),  # a bool is not a number
        (claims(exp=1e400), Reason.BAD_CLAIMS),  # inf
        (claims(nbf="soon"), Reason.BAD_CLAIMS),
        (claims(iat=[NOW]), Reason.BAD_CLAIMS),
        (claims(sub=42), Reason.BAD_CLAIMS),
        (claims(box_user={"id": "x"}), Reason.BAD_CLAIMS),
        (claims(iss="https://idp.example/"), Reason.UNTRUSTED_ISSUER),  # matched exactly
        (claims(iss=None), Reason.UNTRUSTED_ISSUER),
        (claims(exp=NOW - 30), Reason.EXPIRED),  # exp + leeway == now: expired
        (claims(exp=NOW - 3600), Reason.EXPIRED),
        (claims(nbf=NOW + 31), Reason.NOT_YET_VALID),
        (claims(iat=NOW + 31), Reason.ISSUED_IN_FUTURE),
        (claims(aud="other"), Reason.BAD_AUDIENCE),
        (claims(aud=["other", "another"]), Reason.BAD_AUDIENCE),
        (claims(aud=None), Reason.BAD_AUDIENCE),  # configured audience, token has none
        (claims(aud=[]), Reason.BAD_AUDIENCE),
        (claims(aud=["api", 7]), Reason.BAD_AUDIENCE),
    ],
)
def test_claim_rejections(token_claims: Mapping[str, Any], reason: Reason) -> None:
    with pytest.raises(TokenRejected) as caught:
        checked(token_claims)
    assert caught.value.reason is reason


@pytest.mark.parametrize(
    "token_claims",
    [
        claims(),
        claims(exp=NOW - 29),  # within leeway
        claims(nbf=NOW + 30, iat=NOW + 30),  # within leeway
        claims(exp=NOW + 0.5),  # a float exp is a number too
        claims(aud=["other", "api"]),  # shares one audience
    ],
)
def test_claims_accepted(token_claims: Mapping[str, Any]) -> None:
    checked(token_claims)


def test_audience_is_not_checked_when_not_configured() -> None:
    checked(claims(aud="anything"), audiences=None)
    checked(claims(aud=None), audiences=None)


# --------------------------------------------------------------------------- static keys


async def test_static_source_offers_only_configured_algorithms() -> None:
    source = StaticKeySource.from_config(HMAC)
    assert source is not None
    assert await source.keys_for(None, "HS256")
    for alg in ("none", "RS256", "ES256"):
        with pytest.raises(TokenRejected) as caught:
            await source.keys_for(None, alg)
        assert caught.value.reason is Reason.BAD_ALGORITHM


async def test_static_source_looks_keys_up_by_kid() -> None:
    config = jwt_config(keys=[{"kty": "OCT", "alg": "HS256", "kid": "k1", "k": SECRET.decode(), "format": "plain"}])
    source = StaticKeySource.from_config(config)
    assert source is not None
    assert [k.kid for k in await source.keys_for("k1", "HS256")] == ["k1"]
    assert [k.kid for k in await source.keys_for(None, "HS256")] == ["k1"]
    with pytest.raises(TokenRejected) as caught:
        await source.keys_for("k2", "HS256")
    assert caught.value.reason is Reason.UNKNOWN_KEY


def test_static_keys_never_change_and_never_expire() -> None:
    source = StaticKeySource.from_config(HMAC)
    assert source is not None
    assert source.generation == 0
    assert source.trusted_until() == math.inf


def test_no_static_source_for_a_jwks_introspector() -> None:
    config = jwt_config(jwks_uri="https://idp.example/jwks")
    assert StaticKeySource.from_config(config) is None


# --------------------------------------------------------------------------- JwtIntrospector


async def test_valid_token_becomes_an_identity() -> None:
    token = hs_token(claims(box_user="box-7"), SECRET)
    identity = await introspector().introspect(Credential(token))
    assert identity.user_id == "box-7"
    assert identity.introspector == "idp"
    assert identity.kind == "jwt"
    assert identity.expires_at == NOW + 300
    assert identity.claims["sub"] == "user-1"


async def test_asymmetric_key_verifies_its_tokens() -> None:
    identity = await introspector(EC).introspect(Credential(SIGNER.sign(claims(aud=None))))
    assert identity.user_id == "user-1"


async def test_wrong_key_is_a_bad_signature() -> None:
    other_secret = b"another-secret-of-at-least-32-bytes"
    assert await rejection(introspector(), hs_token(claims(), other_secret)) is Reason.BAD_SIGNATURE
    assert await rejection(introspector(EC), EcSigner("ec-1").sign(claims(aud=None))) is Reason.BAD_SIGNATURE


async def test_tampered_claims_are_a_bad_signature() -> None:
    head, _, signature = hs_token(claims(), SECRET).split(".")
    payload = b64url(json.dumps(claims(sub="admin")).encode())
    forged = f"{head}.{payload}.{signature}"
    assert await rejection(introspector(), forged) is Reason.BAD_SIGNATURE


async def test_alg_none_is_refused() -> None:
    assert await rejection(introspector(), compact({"alg": "none"}, claims(), b"")) is Reason.BAD_ALGORITHM


async def test_hmac_signed_with_the_public_key_is_refused() -> None:
    # The classic confusion: the attacker signs HS256 with the published PEM as the HMAC secret.
    token = hs_token(claims(aud=None), SIGNER.public_pem().encode())
    assert await rejection(introspector(EC), token) is Reason.BAD_ALGORITHM


async def test_an_alg_not_configured_for_the_key_is_refused() -> None:
    config = jwt_config(keys=[{"kty": "OCT", "alg": "HS256", "k": SECRET.decode(), "format": "plain"}])
    token = hs_token(claims(aud=None), SECRET, alg="HS512")
    assert await rejection(introspector(config), token) is Reason.BAD_ALGORITHM


@pytest.mark.parametrize("header", ["jwk", "jku", "x5u"])
async def test_keys_named_by_the_token_are_never_used(header: str) -> None:
    attacker = EcSigner(None)
    value: Any = attacker.jwk() if header == "jwk" else "https://attacker.example/keys"
    token = attacker.sign(claims(aud=None), **{header: value})
    assert await rejection(introspector(EC), token) is Reason.BAD_SIGNATURE


async def test_signature_is_checked_before_the_claims() -> None:
    # An expired token with a wrong signature tells its sender nothing about its claims.
    token = hs_token(claims(exp=NOW - 3600), b"another-secret-of-at-least-32-bytes")
    assert await rejection(introspector(), token) is Reason.BAD_SIGNATURE


async def test_the_injected_clock_decides_expiry() -> None:
    clock = FakeClock()
    intro = introspector(clock=clock)
    token = hs_token(claims(exp=NOW + 10), SECRET)
    clock.advance(10 + 29)  # within the 30 s leeway
    assert (await intro.introspect(Credential(token))).user_id == "user-1"
    clock.advance(1)
    assert await rejection(intro, token) is Reason.EXPIRED


async def test_a_token_of_another_issuer_is_refused_before_any_key_lookup() -> None:
    # Reachable through a bound source (cookie, from_headers): the router routes the rest by iss.
    source = CountingKeySource(StaticKeySource.from_config(HMAC))
    intro = JwtIntrospector(HMAC, source, clock=FakeClock())
    assert await rejection(intro, hs_token(claims(iss="https://other.example"), SECRET)) is Reason.UNTRUSTED_ISSUER
    assert source.lookups == 0


async def test_a_parsed_credential_is_not_parsed_again() -> None:
    token = hs_token(claims(), SECRET)
    parsed = parse_jwt(token)
    identity = await introspector().introspect(Credential("ignored", jwt=parsed))
    assert identity.user_id == "user-1"


# --------------------------------------------------------------------------- how long a verification lasts


class CountingKeySource:
    """A KeySource over fixed keys whose expiry and generation the test sets."""

    def __init__(self, inner: StaticKeySource | None, trusted: float = math.inf) -> None:
        assert inner is not None
        self._inner = inner
        self.generation = 0
        self.trusted = trusted
        self.lookups = 0

    def trusted_until(self) -> float:
        return self.trusted

    async def keys_for(self, kid: str | None, alg: str) -> Sequence[VerificationKey]:
        self.lookups += 1
        return await self._inner.keys_for(kid, alg)

    async def keys_after_bad_signature(
        self, kid: str | None, alg: str, tried: Sequence[VerificationKey]
    ) -> Sequence[VerificationKey]:
        return await self._inner.keys_after_bad_signature(kid, alg, tried)


async def test_trusted_until_the_token_expires_plus_leeway() -> None:
    intro = introspector()
    identity = await intro.introspect(Credential(hs_token(claims(exp=NOW + 100), SECRET)))
    assert intro.trusted_until(identity) == NOW + 100 + 30


async def test_trusted_until_the_keys_expire_when_that_is_sooner() -> None:
    source = CountingKeySource(StaticKeySource.from_config(HMAC), trusted=NOW + 60)
    intro = JwtIntrospector(HMAC, source, clock=FakeClock())
    identity = await intro.introspect(Credential(hs_token(claims(exp=NOW + 100), SECRET)))
    assert intro.trusted_until(identity) == NOW + 60


def test_key_generation_is_the_key_sources() -> None:
    source = CountingKeySource(StaticKeySource.from_config(HMAC))
    intro = JwtIntrospector(HMAC, source)
    source.generation = 3
    assert intro.key_generation == 3


def test_introspector_is_routed_by_its_issuer() -> None:
    intro = introspector()
    assert intro.id == "idp"
    assert intro.issuer == ISS


# --------------------------------------------------------------------------- sender-constrained tokens


JKT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
X5T = "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"


async def test_a_bound_token_keeps_its_confirmation_for_the_proof_check() -> None:
    # RFC 9449 DPoP and RFC 8705 mTLS: verified here, proved per request in decide.py.
    for cnf, expected in (
        ({"jkt": JKT}, Confirmation(jkt=JKT)),
        ({"x5t#S256": X5T}, Confirmation(x5t_s256=X5T)),
        (None, None),
    ):
        identity = await introspector().introspect(Credential(hs_token(claims(cnf=cnf), SECRET)))
        assert identity.confirmation == expected, cnf


@pytest.mark.parametrize(
    ("cnf", "reason"),
    [
        ({}, Reason.BAD_CNF),
        ({"jkt": "short"}, Reason.BAD_CNF),
        ({"jwk": {"kty": "EC"}}, Reason.UNSUPPORTED_CNF),  # a confirmation we cannot check: refused
    ],
)
async def test_a_confirmation_we_cannot_check_is_refused(cnf: dict[str, Any], reason: Reason) -> None:
    assert await rejection(introspector(), hs_token(claims(cnf=cnf), SECRET)) is reason


async def test_a_required_sender_constraint_refuses_a_plain_bearer_token() -> None:
    required = jwt_config({"sender_constraint": "required"}, secret=SECRET.decode(), aud="api")
    assert await rejection(introspector(required), hs_token(claims(), SECRET)) is Reason.SENDER_CONSTRAINT_REQUIRED
    bound = await introspector(required).introspect(Credential(hs_token(claims(cnf={"jkt": JKT}), SECRET)))
    assert bound.confirmation == Confirmation(jkt=JKT)


async def test_static_keys_offer_nothing_more_after_a_bad_signature() -> None:
    source = StaticKeySource.from_config(HMAC)
    assert source is not None
    keys = await source.keys_for(None, "HS256")
    assert await source.keys_after_bad_signature(None, "HS256", keys) == ()


async def test_a_forged_bound_token_is_a_bad_signature_first() -> None:
    # The signature is checked before anything the claims say, `cnf` included.
    assert await rejection(introspector(), hs_token(claims(cnf={"jkt": "x"}), b"w" * 32)) is Reason.BAD_SIGNATURE


# --------------------------------------------------------------------------- issue 16's hostile findings
# (items 2, 3 and 6, formerly tests/unit/test_jwt_hardening.py); `bare_claims` carries no `aud`.
#
# - An alg no key could ever verify (`none`, `None`, a JWE alg, a typo) is a 401 before any key
#   lookup, whatever the key source: no JWKS or discovery fetch, even with an unknown kid.
# - Any `b64` header (RFC 7797 unencoded payloads) is refused.
# - `jwt.max_lifetime` bounds exp - iat (or exp - now without iat), as Envoy jwt_authn's.
# - `exp`, `nbf` and `iat` past the year 9999 are malformed claims, so no token "never expires".

SIGNER_K1 = EcSigner("k1")
HOUR = 3600


def bare_claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"iss": ISS, "sub": "user-1", "iat": NOW, "exp": NOW + 300}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


async def reason_of(introspector: JwtIntrospector, token: str) -> Reason:
    with pytest.raises(TokenRejected) as caught:
        await introspector.introspect(Credential(token))
    return caught.value.reason


# --------------------------------------------------------------------------- item 2: no key lookup for hopeless algs


class Sources:
    """One introspector per kind of key source; the JWKS and discovery ones count their fetches."""

    def __init__(self) -> None:
        self.idp = FakeIdpClient(jwks(SIGNER_K1))
        self.idp.by_url[ISS + "/.well-known/openid-configuration"] = {"issuer": ISS, "jwks_uri": ISS + "/jwks"}
        clock = FakeClock(0.0)
        secret = jwt_config(secret=SECRET.decode())
        keys = jwt_config(keys=[{"kty": "EC", "alg": "ES256", "kid": "k1", "pub": SIGNER_K1.public_pem()}])
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
        token = compact(header, bare_claims(), b"" if alg.lower() == "none" else b"sig")
        assert await reason_of(s.introspectors[kind], token) is Reason.BAD_ALGORITHM
    assert s.idp.calls == []  # not one JWKS or discovery fetch


async def test_hmac_against_a_jwks_source_is_refused_without_a_fetch() -> None:
    # HMAC is verifiable in general, but never with keys from a JWKS: that source refuses it first.
    s = Sources()
    token = hs_token(bare_claims(), SECRET, kid="unknown-kid")
    assert await reason_of(s.introspectors["jwks_uri"], token) is Reason.BAD_ALGORITHM
    assert s.idp.calls == []


async def test_a_verifiable_alg_with_an_unknown_kid_still_refetches_once() -> None:
    # The counterpart: the early refusal is about the alg only, not about unknown kids in general.
    s = Sources()
    token = EcSigner("new").sign(bare_claims())
    assert await reason_of(s.introspectors["jwks_uri"], token) is Reason.UNKNOWN_KEY
    assert len(s.idp.calls) == 2  # the cold fetch, then one unknown-kid refetch


# --------------------------------------------------------------------------- item 3: b64


@pytest.mark.parametrize("b64", [False, True, "false", None, 0])
def test_any_b64_header_is_refused(b64: Any) -> None:
    assert parse_reason(compact({"alg": "HS256", "b64": b64}, bare_claims())) is Reason.MALFORMED
    assert parse_reason(hs_token(bare_claims(), SECRET, b64=b64)) is Reason.MALFORMED


def test_b64_listed_in_crit_is_an_unsupported_extension() -> None:
    token = compact({"alg": "HS256", "b64": False, "crit": ["b64"]}, bare_claims())
    assert parse_reason(token) is Reason.UNSUPPORTED_CRIT


async def test_a_validly_signed_b64_false_token_is_refused() -> None:
    # Signed over the raw payload as RFC 7797 would, without crit: a verifier ignoring b64 would
    # check the signature over the base64url text instead and could be made to accept another payload.
    config = jwt_config(secret=SECRET.decode())
    source = StaticKeySource.from_config(config)
    assert source is not None
    introspector = JwtIntrospector(config, source, clock=FakeClock())
    assert await reason_of(introspector, hs_token(bare_claims(), SECRET, b64=False)) is Reason.MALFORMED
    assert (await introspector.introspect(Credential(hs_token(bare_claims(), SECRET)))).user_id == "user-1"


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
        (bare_claims(iat=NOW, exp=NOW + HOUR), None),  # exactly max_lifetime
        (bare_claims(iat=NOW, exp=NOW + HOUR + 1), Reason.LIFETIME_TOO_LONG),
        (
            bare_claims(iat=NOW - HOUR, exp=NOW + 60),
            Reason.LIFETIME_TOO_LONG,
        ),  # lived long already: exp - iat counts
        (bare_claims(iat=NOW - 600, exp=NOW + 2400), None),
        (bare_claims(iat=None, exp=NOW + HOUR), None),
        (bare_claims(iat=None, exp=NOW + HOUR + 30), None),  # exp - now, with the leeway for clock skew
        (bare_claims(iat=None, exp=NOW + HOUR + 31), Reason.LIFETIME_TOO_LONG),
        (bare_claims(iat=NOW, exp=10**11), Reason.LIFETIME_TOO_LONG),  # the year 5138: valid, but far too long
    ],
)
def test_max_lifetime(token_claims: dict[str, Any], reason: Reason | None) -> None:
    assert lifetime_reason(token_claims, HOUR) is reason


def test_no_max_lifetime_means_no_limit() -> None:
    assert lifetime_reason(bare_claims(exp=MAX_NUMERIC_DATE), None) is None
    assert jwt_config(secret=SECRET.decode()).max_lifetime is None


@pytest.mark.parametrize(
    ("token_claims", "reason"),
    [
        (bare_claims(exp=10**25), Reason.BAD_CLAIMS),  # 26 digits: "never expires"
        (bare_claims(exp=MAX_NUMERIC_DATE + 1), Reason.BAD_CLAIMS),
        (bare_claims(exp=float(MAX_NUMERIC_DATE) + 0.5), Reason.BAD_CLAIMS),
        (bare_claims(exp=1e300), Reason.BAD_CLAIMS),
        (bare_claims(nbf=10**25), Reason.BAD_CLAIMS),
        (bare_claims(iat=10**25), Reason.BAD_CLAIMS),
        (bare_claims(exp=MAX_NUMERIC_DATE), None),  # 9999-12-31T23:59:59Z is still a date
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
    assert (
        await introspector.introspect(Credential(hs_token(bare_claims(exp=NOW + HOUR), SECRET)))
    ).user_id == "user-1"
    long_lived = hs_token(bare_claims(exp=NOW + 2 * HOUR), SECRET)
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
