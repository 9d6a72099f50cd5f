"""identity_token: the JWT the service signs for the upstream on an allow (issue #23 item 3),
verified against its own JWKS document by PyJWT and by jwcrypto, cached for half its life."""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwcrypto import jwk as jw_jwk  # type: ignore[import-untyped]  # no type information shipped
from jwcrypto import jwt as jw_jwt

from authz_service.errors import ConfigError
from authz_service.identity_token import IdentityTokenMinter, parse_identity_token


def pem(key: Any) -> str:
    raw: bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return raw.decode()


EC_PEM = pem(ec.generate_private_key(ec.SECP256R1()))
EC2_PEM = pem(ec.generate_private_key(ec.SECP256R1()))
P384_PEM = pem(ec.generate_private_key(ec.SECP384R1()))
ED_PEM = pem(ed25519.Ed25519PrivateKey.generate())
RSA_PEM = pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
RSA1024_PEM = pem(rsa.generate_private_key(public_exponent=65537, key_size=1024))
PEMS = {"ES256": EC_PEM, "EdDSA": ED_PEM, "RS256": RSA_PEM}
ISSUER = "https://authz.example.com"
CLAIMS = {"email": "ann@example.com", "roles": ["admin"], "secret_claim": "never", "sub": "not-this"}


def raw_config(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "header": "x-identity-token",
        "issuer": ISSUER,
        "audience": ["orders-api"],
        "ttl": 300,
        "claims": ["email", "roles"],
        "keys": [{"kid": "k1", "alg": "ES256", "private_pem": EC_PEM}],
    }
    raw.update(overrides)
    return raw


class Clocks:
    """An injected monotonic clock and wall clock that move together."""

    def __init__(self) -> None:
        self.mono = 1000.0
        # The real present: PyJWT and jwcrypto check exp and iat against the real clock.
        self.epoch = float(int(time.time()))

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.epoch += seconds


def minter(clocks: Clocks | None = None, **overrides: Any) -> IdentityTokenMinter:
    clocks = clocks or Clocks()
    return IdentityTokenMinter(
        parse_identity_token(raw_config(**overrides), "response"), clock=lambda: clocks.mono, wall=lambda: clocks.epoch
    )


def verify_pyjwt(token: str, jwks: bytes, now: float, audience: str = "orders-api") -> dict[str, Any]:
    """PyJWT against the published key set (built from the JSON, no PyJWKClient)."""
    keyset = jwt.PyJWKSet.from_json(jwks.decode())
    key = keyset[jwt.get_unverified_header(token)["kid"]]
    assert key.algorithm_name is not None
    claims: dict[str, Any] = jwt.decode(
        token,
        key=key.key,
        algorithms=[key.algorithm_name],
        audience=audience,
        issuer=ISSUER,
        # Time is checked against the injected clock below: PyJWT only reads the real one.
        options={"require": ["exp", "iat", "iss", "aud", "sub"], "verify_exp": False, "verify_iat": False},
    )
    assert claims["iat"] <= now < claims["exp"]
    return claims


def verify_jwcrypto(token: str, jwks: bytes, now: float) -> dict[str, Any]:
    """A second JOSE library: jwcrypto, from the same JWKS document."""
    keyset = jw_jwk.JWKSet.from_json(jwks.decode())
    parsed = jw_jwt.JWT(
        jwt=token,
        key=keyset,
        check_claims={"iss": ISSUER, "aud": "orders-api", "exp": None, "iat": None},
        expected_type="JWS",
    )
    parsed.validity = 0
    claims: dict[str, Any] = json.loads(parsed.claims)
    assert claims["iat"] <= now < claims["exp"]
    return claims


@pytest.mark.parametrize("alg", ["ES256", "EdDSA", "RS256"])
def test_a_minted_token_verifies_against_the_jwks_with_two_libraries(alg: str) -> None:
    clocks = Clocks()
    mint = minter(clocks, keys=[{"kid": "k-" + alg, "alg": alg, "private_pem": PEMS[alg]}])
    token = mint.token_for("ann", CLAIMS, "orders-read", "keycloak", cache_key=b"h1")
    assert jwt.get_unverified_header(token) == {"alg": alg, "kid": "k-" + alg, "typ": "JWT"}
    expected = {
        "iss": ISSUER,
        "aud": "orders-api",
        "sub": "ann",
        "iat": int(clocks.epoch),
        "exp": int(clocks.epoch) + 300,
        "email": "ann@example.com",
        "roles": ["admin"],
        "policy": "orders-read",
        "introspector": "keycloak",
    }
    assert verify_pyjwt(token, mint.jwks_document(), clocks.epoch) == expected
    assert verify_jwcrypto(token, mint.jwks_document(), clocks.epoch) == expected


def test_a_token_signed_by_another_key_with_the_same_kid_does_not_verify() -> None:
    clocks = Clocks()
    real = minter(clocks)
    forged = minter(clocks, keys=[{"kid": "k1", "alg": "ES256", "private_pem": EC2_PEM}])
    token = forged.token_for("ann", CLAIMS, None, "kc", cache_key=1)
    with pytest.raises(jwt.InvalidSignatureError):
        verify_pyjwt(token, real.jwks_document(), clocks.epoch)


def test_only_listed_claims_are_copied_and_own_claims_win() -> None:
    clocks = Clocks()
    mint = minter(clocks, claims=["email"], audience="orders-api")
    claims = verify_pyjwt(mint.token_for("ann", CLAIMS, None, None, cache_key=1), mint.jwks_document(), clocks.epoch)
    assert claims == {
        "iss": ISSUER,
        "aud": "orders-api",
        "sub": "ann",
        "iat": int(clocks.epoch),
        "exp": int(clocks.epoch) + 300,
        "email": "ann@example.com",
    }


def test_a_listed_claim_the_identity_lacks_is_left_out_and_audiences_stay_a_list() -> None:
    clocks = Clocks()
    mint = minter(clocks, audience=["orders-api", "billing"])
    claims = verify_pyjwt(mint.token_for("ann", {}, None, None, cache_key=1), mint.jwks_document(), clocks.epoch)
    assert "email" not in claims
    assert "roles" not in claims
    assert claims["aud"] == ["orders-api", "billing"]


def test_the_token_never_outlives_the_credential() -> None:
    clocks = Clocks()
    mint = minter(clocks)
    token = mint.token_for("ann", CLAIMS, None, None, cache_key=1, not_after=clocks.epoch + 40.7)
    claims = verify_pyjwt(token, mint.jwks_document(), clocks.epoch)
    assert claims["exp"] == int(clocks.epoch) + 40
    clocks.advance(19)
    assert mint.token_for("ann", CLAIMS, None, None, cache_key=1, not_after=clocks.epoch + 21.7) == token
    clocks.advance(2)  # past half of its 40 s
    assert mint.token_for("ann", CLAIMS, None, None, cache_key=1, not_after=clocks.epoch + 19.7) != token


def test_a_cached_token_is_reused_until_half_its_ttl_then_minted_again() -> None:
    clocks = Clocks()
    mint = minter(clocks)
    first = mint.token_for("ann", CLAIMS, "p", "kc", cache_key=b"h1")
    clocks.advance(149.9)
    assert mint.token_for("ann", CLAIMS, "p", "kc", cache_key=b"h1") is first
    clocks.advance(0.1)
    second = mint.token_for("ann", CLAIMS, "p", "kc", cache_key=b"h1")
    assert second != first
    assert verify_pyjwt(second, mint.jwks_document(), clocks.epoch)["iat"] == int(clocks.epoch)


def test_the_cache_is_per_identity_policy_and_introspector() -> None:
    mint = minter()
    base = mint.token_for("ann", CLAIMS, "p", "kc", cache_key=b"h1")
    assert mint.token_for("ann", CLAIMS, "other", "kc", cache_key=b"h1") != base
    assert mint.token_for("ann", CLAIMS, None, "kc", cache_key=b"h1") != base
    assert mint.token_for("ann", CLAIMS, "p", "other", cache_key=b"h1") != base
    assert mint.token_for("bob", CLAIMS, "p", "kc", cache_key=b"h2") != base
    assert mint.token_for("ann", CLAIMS, "p", "kc", cache_key=b"h1") is base


def test_the_cache_is_bounded() -> None:
    config = parse_identity_token(raw_config(), "response")
    mint = IdentityTokenMinter(config, clock=lambda: 0.0, wall=lambda: 1_800_000_000.0, max_entries=64)
    first = mint.token_for("u0", {}, None, None, cache_key=0)
    for n in range(1, 200):
        mint.token_for(f"u{n}", {}, None, None, cache_key=n)
    assert mint.token_for("u199", {}, None, None, cache_key=199) is mint.token_for(
        "u199", {}, None, None, cache_key=199
    )
    assert mint.token_for("u0", {}, None, None, cache_key=0) is not first  # evicted: signed again
    assert len(mint._cache) <= 64


def test_rotation_the_first_key_signs_all_are_published_and_old_tokens_verify() -> None:
    clocks = Clocks()
    before = minter(clocks)
    old = before.token_for("ann", CLAIMS, None, None, cache_key=1)
    after = minter(
        clocks,
        keys=[
            {"kid": "k2", "alg": "EdDSA", "private_pem": ED_PEM},
            {"kid": "k1", "alg": "ES256", "private_pem": EC_PEM},
        ],
    )
    new = after.token_for("ann", CLAIMS, None, None, cache_key=1)
    assert jwt.get_unverified_header(new)["kid"] == "k2"
    published = json.loads(after.jwks_document())["keys"]
    assert [key["kid"] for key in published] == ["k2", "k1"]
    assert verify_pyjwt(old, after.jwks_document(), clocks.epoch)["sub"] == "ann"
    assert verify_pyjwt(new, after.jwks_document(), clocks.epoch)["sub"] == "ann"
    assert verify_jwcrypto(old, after.jwks_document(), clocks.epoch)["sub"] == "ann"


def test_the_jwks_publishes_public_keys_only() -> None:
    mint = minter(
        keys=[
            {"kid": "a", "alg": "ES256", "private_pem": EC_PEM},
            {"kid": "b", "alg": "EdDSA", "private_pem": ED_PEM},
            {"kid": "c", "alg": "RS256", "private_pem": RSA_PEM},
        ]
    )
    for key in json.loads(mint.jwks_document())["keys"]:
        assert not {"d", "p", "q", "dp", "dq", "qi", "k"} & set(key)
        assert key["use"] == "sig"
    assert [(k["kid"], k["alg"], k["kty"]) for k in json.loads(mint.jwks_document())["keys"]] == [
        ("a", "ES256", "EC"),
        ("b", "EdDSA", "OKP"),
        ("c", "RS256", "RSA"),
    ]


def test_the_discovery_document_names_the_issuer_and_the_jwks() -> None:
    mint = minter(
        keys=[
            {"kid": "a", "alg": "ES256", "private_pem": EC_PEM},
            {"kid": "b", "alg": "RS256", "private_pem": RSA_PEM},
            {"kid": "c", "alg": "ES256", "private_pem": EC2_PEM},
        ]
    )
    document = json.loads(mint.openid_configuration("http://127.0.0.1:9002/"))
    assert document["issuer"] == ISSUER
    assert document["jwks_uri"] == "http://127.0.0.1:9002/.well-known/jwks.json"
    assert document["id_token_signing_alg_values_supported"] == ["ES256", "RS256"]
    assert {"sub", "policy", "introspector", "email", "roles"} <= set(document["claims_supported"])


def test_the_same_config_parses_equal() -> None:
    assert parse_identity_token(raw_config(), "response") == parse_identity_token(raw_config(), "response")
    assert parse_identity_token(raw_config(), "response") != parse_identity_token(
        raw_config(keys=[{"kid": "k1", "alg": "ES256", "private_pem": EC2_PEM}]), "response"
    )


def test_http_is_accepted_on_loopback_only() -> None:
    assert parse_identity_token(raw_config(issuer="http://127.0.0.1:9002"), "r").issuer == "http://127.0.0.1:9002"
    assert parse_identity_token(raw_config(issuer="http://localhost"), "r").issuer == "http://localhost"
    assert parse_identity_token(raw_config(issuer="http://[::1]:80"), "r").issuer == "http://[::1]:80"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"header": "Authorization"}, "identity_token.header must not be 'authorization'"),
        ({"header": "x-envoy-original-path"}, "identity_token.header must not be 'x-envoy-original-path'"),
        ({"header": "x-forwarded-for"}, "identity_token.header must not be 'x-forwarded-for'"),
        ({"header": "host"}, "identity_token.header must not be 'host'"),
        ({"header": "x identity"}, "identity_token.header must be an HTTP header name"),
        ({"header": ":authority"}, "identity_token.header must be an HTTP header name"),
        ({"issuer": "http://authz.example.com"}, "identity_token.issuer must be an https:// URL (http:// only on"),
        ({"issuer": "https://authz.example.com?x=1"}, "identity_token.issuer must be an https:// URL without"),
        ({"issuer": "https://user:pw@authz.example.com"}, "identity_token.issuer must be an https:// URL without"),
        ({"issuer": "authz.example.com"}, "identity_token.issuer must be an https:// URL"),
        ({"issuer": None}, "identity_token.issuer is required"),
        ({"audience": []}, "identity_token.audience must be a non-empty string or a non-empty list"),
        ({"audience": ["a", ""]}, "identity_token.audience must be a non-empty string"),
        ({"audience": [3]}, "identity_token.audience must be a non-empty string"),
        ({"ttl": 9}, "identity_token.ttl must be between 10 and 86400, got 9"),
        ({"ttl": 86401}, "identity_token.ttl must be between 10 and 86400, got 86401"),
        ({"claims": ["email", "sub"]}, "identity_token.claims[1] must not be 'sub'"),
        ({"claims": ["email", "email"]}, "identity_token.claims[1] lists 'email' twice"),
        ({"claims": [""]}, "identity_token.claims[0] must be a claim name"),
        ({"keys": []}, "identity_token.keys must list at least one signing key"),
        ({"keys": None}, "identity_token.keys is required"),
        ({"keys": ["k"]}, "identity_token.keys[0] must be a mapping"),
        (
            {
                "keys": [
                    {"kid": "k1", "alg": "ES256", "private_pem": EC_PEM},
                    {"kid": "k1", "alg": "EdDSA", "private_pem": ED_PEM},
                ]
            },
            "identity_token.keys[1].kid 'k1' is used by an earlier key",
        ),
        ({"keys": [{"kid": 'k"1', "alg": "ES256", "private_pem": EC_PEM}]}, "identity_token.keys[0].kid must be"),
        ({"keys": [{"kid": "k1", "alg": "HS256", "private_pem": EC_PEM}]}, "identity_token.keys[0].alg must be one of"),
        ({"keys": [{"kid": "k1", "alg": "none", "private_pem": EC_PEM}]}, "identity_token.keys[0].alg must be one of"),
        ({"keys": [{"kid": "k1", "alg": "ES256", "private_pem": ED_PEM}]}, "keys[0].private_pem must be an EC P-256"),
        ({"keys": [{"kid": "k1", "alg": "ES256", "private_pem": P384_PEM}]}, "keys[0].private_pem must be an EC P-256"),
        ({"keys": [{"kid": "k1", "alg": "EdDSA", "private_pem": RSA_PEM}]}, "keys[0].private_pem must be an Ed25519"),
        ({"keys": [{"kid": "k1", "alg": "RS256", "private_pem": EC_PEM}]}, "keys[0].private_pem must be an RSA key"),
        ({"keys": [{"kid": "k1", "alg": "RS256", "private_pem": RSA1024_PEM}]}, "is a 1024-bit RSA key; at least 2048"),
        (
            {"keys": [{"kid": "k1", "alg": "ES256", "private_pem": "nope"}]},
            "keys[0].private_pem must be an unencrypted",
        ),
        ({"keys": [{"kid": "k1", "alg": "ES256"}]}, "identity_token.keys[0].private_pem is required"),
        ({"keys": [{"kid": "k1", "alg": "ES256", "private_pem": EC_PEM, "pub": "x"}]}, "keys[0].pub is not a known"),
        ({"issuer_url": ISSUER}, "identity_token.issuer_url is not a known field"),
    ],
)
def test_bad_configs_are_refused_naming_the_field(overrides: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_identity_token(raw_config(**overrides), "response")
    message = str(caught.value)
    assert f"response: {expected}" in message or expected in message
    assert "PRIVATE KEY" not in message


def test_a_public_key_or_a_mangled_pem_never_shows_in_the_message() -> None:
    public = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    mangled = EC_PEM[:60] + "!!" + EC_PEM[62:]
    for bad in (public, mangled):
        with pytest.raises(ConfigError) as caught:
            parse_identity_token(raw_config(keys=[{"kid": "k1", "alg": "ES256", "private_pem": bad}]), "response")
        assert (
            str(caught.value) == "response: identity_token.keys[0].private_pem must be an unencrypted PEM private key"
        )
