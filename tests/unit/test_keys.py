"""Tests for verification keys: which algorithms a key may verify, and that it verifies only those."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import hmac
import json
import logging
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from prometheus_client import CollectorRegistry

from authz_service.config.model import JwtIntrospectorConfig
from authz_service.errors import ConfigError, UpstreamUnavailable
from authz_service.metrics import Metrics
from authz_service.registries import static_key, validate_config
from authz_service.tokens import keys as key_loading
from authz_service.tokens.jwks import JwksKeySource, parse_jwks
from authz_service.tokens.keys import (
    MIN_RSA_BITS,
    VERIFIABLE_ALGORITHMS,
    BadKey,
    SkippedKey,
    VerificationKey,
    hmac_key,
    load_jwk,
    read_jwk,
)
from tests.unit.fakes import FakeClock, FakeIdpClient


def load_static_key(raw: dict[str, Any]) -> VerificationKey:
    """A `jwt.keys` entry as config validation and the introspector load it: fields, then key material."""
    return key_loading.load_static_key(static_key(raw))


RSA_ALGS = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
HMAC_ALGS = {"HS256", "HS384", "HS512"}
SECRET = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"  # 64 bytes: fine for HS512
GARBAGE_PUBLIC_PEM = "-----BEGIN PUBLIC KEY-----\nZ2FyYmFnZQ==\n-----END PUBLIC KEY-----\n"
GARBAGE_CERT_PEM = "-----BEGIN CERTIFICATE-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE-----\n"
OTHER_SECRET = b"fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210"


# --------------------------------------------------------------------------- key material


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    """Private keys, two of each kind (the second one is 'another key')."""
    return {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "rsa2": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "p256": ec.generate_private_key(ec.SECP256R1()),
        "p256b": ec.generate_private_key(ec.SECP256R1()),
        "p384": ec.generate_private_key(ec.SECP384R1()),
        "p384b": ec.generate_private_key(ec.SECP384R1()),
        "p521": ec.generate_private_key(ec.SECP521R1()),
        "p521b": ec.generate_private_key(ec.SECP521R1()),
        "ed": ed25519.Ed25519PrivateKey.generate(),
        "edb": ed25519.Ed25519PrivateKey.generate(),
    }


# alg -> (key name, another key name of the same kind)
ASYMMETRIC = {
    "RS256": ("rsa", "rsa2"),
    "RS384": ("rsa", "rsa2"),
    "RS512": ("rsa", "rsa2"),
    "PS256": ("rsa", "rsa2"),
    "PS384": ("rsa", "rsa2"),
    "PS512": ("rsa", "rsa2"),
    "ES256": ("p256", "p256b"),
    "ES384": ("p384", "p384b"),
    "ES512": ("p521", "p521b"),
    "EdDSA": ("ed", "edb"),
}
KTY = {"rsa": "RSA", "p256": "EC", "p384": "EC", "p521": "EC", "ed": "OKP"}


PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def public_pem(private_key: PrivateKey) -> str:
    return (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def public_jwk(private_key: PrivateKey) -> dict[str, Any]:
    public = private_key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        return RSAAlgorithm.to_jwk(public, as_dict=True)
    if isinstance(public, ec.EllipticCurvePublicKey):
        return ECAlgorithm.to_jwk(public, as_dict=True)
    return OKPAlgorithm.to_jwk(public, as_dict=True)


def private_jwk(private_key: PrivateKey) -> dict[str, Any]:
    if isinstance(private_key, rsa.RSAPrivateKey):
        return RSAAlgorithm.to_jwk(private_key, as_dict=True)
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        return ECAlgorithm.to_jwk(private_key, as_dict=True)
    return OKPAlgorithm.to_jwk(private_key, as_dict=True)


def b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(alg: str, key: Any, claims: dict[str, Any] | None = None) -> tuple[bytes, bytes]:
    """(signing input, signature) of a JWT made by PyJWT."""
    token = jwt.encode(claims or {"sub": "alice", "iss": "https://idp"}, key, algorithm=alg)
    header, payload, signature = token.split(".")
    return f"{header}.{payload}".encode(), b64url_decode(signature)


def assert_public_only(key: VerificationKey) -> None:
    """A loaded key holds nothing that could sign an asymmetric token."""
    private_types = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)
    for alg, (_algorithm, prepared) in key.verifiers.items():
        assert not isinstance(prepared, private_types), alg


# --------------------------------------------------------------------------- load_static_key


@pytest.mark.parametrize("alg", sorted(ASYMMETRIC))
def test_static_pem_key_has_exactly_its_configured_alg(keys: dict[str, Any], alg: str) -> None:
    name = ASYMMETRIC[alg][0]
    key = load_static_key({"kty": KTY[name], "alg": alg, "format": "PEM", "pub": public_pem(keys[name]), "kid": "k-1"})
    assert key.algorithms == frozenset({alg})
    assert key.kid == "k-1"
    assert_public_only(key)


@pytest.mark.parametrize("alg", sorted(HMAC_ALGS))
def test_static_oct_key_has_exactly_its_configured_alg(alg: str) -> None:
    key = load_static_key({"kty": "OCT", "alg": alg, "format": "plain", "k": SECRET.decode()})
    assert key.algorithms == frozenset({alg})
    assert key.kid is None


def test_static_format_defaults_to_pem_or_plain(keys: dict[str, Any]) -> None:
    assert load_static_key({"kty": "RSA", "alg": "RS256", "pub": public_pem(keys["rsa"])}).algorithms == {"RS256"}
    assert load_static_key({"kty": "OCT", "alg": "HS256", "k": SECRET.decode()}).algorithms == {"HS256"}


def test_static_pkcs1_rsa_public_key_is_accepted(keys: dict[str, Any]) -> None:
    pem = keys["rsa"].public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1).decode()
    key = load_static_key({"kty": "RSA", "alg": "RS384", "pub": pem})
    assert key.algorithms == {"RS384"}
    assert key.verify("RS384", *sign("RS384", keys["rsa"]))


def test_static_certificate_pem_is_accepted(keys: dict[str, Any]) -> None:
    private = keys["p256"]
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(private, hashes.SHA256())
    )
    key = load_static_key({"kty": "EC", "alg": "ES256", "pub": cert.public_bytes(serialization.Encoding.PEM).decode()})
    assert key.algorithms == {"ES256"}
    assert key.verify("ES256", *sign("ES256", private))
    assert_public_only(key)


def _private_pem(private_key: PrivateKey) -> str:
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.mark.parametrize(
    ("make_raw", "field"),
    [
        (lambda k: {"kty": "RSA", "alg": "ES256", "pub": public_pem(k["rsa"])}, "alg"),
        (lambda k: {"kty": "RSA", "alg": "HS256", "pub": public_pem(k["rsa"])}, "alg"),
        (lambda k: {"kty": "RSA", "alg": "none", "pub": public_pem(k["rsa"])}, "alg"),
        (lambda k: {"kty": "OCT", "alg": "none", "k": SECRET.decode()}, "alg"),
        (lambda k: {"kty": "EC", "alg": "EdDSA", "pub": public_pem(k["p256"])}, "alg"),
        (lambda k: {"kty": "RSA", "pub": public_pem(k["rsa"])}, "alg"),
        (lambda k: {"alg": "RS256", "pub": public_pem(k["rsa"])}, "kty"),
        (lambda k: {"kty": "DSA", "alg": "RS256", "pub": public_pem(k["rsa"])}, "kty"),
        (lambda k: {"kty": "RSA", "alg": "RS256", "pub": _private_pem(k["rsa"])}, "pub"),
        (lambda k: {"kty": "EC", "alg": "ES256", "pub": _private_pem(k["p256"])}, "pub"),
        (lambda k: {"kty": "RSA", "alg": "RS256", "pub": GARBAGE_PUBLIC_PEM}, "pub"),
        (lambda k: {"kty": "RSA", "alg": "RS256", "pub": GARBAGE_CERT_PEM}, "pub"),
        (lambda k: {"kty": "RSA", "alg": "RS256", "pub": "not a pem"}, "pub"),
        (lambda k: {"kty": "RSA", "alg": "RS256"}, "pub"),
        (lambda k: {"kty": "EC", "alg": "ES384", "pub": public_pem(k["p256"])}, "pub"),
        (lambda k: {"kty": "EC", "alg": "ES256", "pub": public_pem(k["p384"])}, "pub"),
        (lambda k: {"kty": "EC", "alg": "ES512", "pub": public_pem(k["p256"])}, "pub"),
        (lambda k: {"kty": "EC", "alg": "ES256", "pub": public_pem(k["rsa"])}, "pub"),
        (lambda k: {"kty": "RSA", "alg": "RS256", "pub": public_pem(k["p256"])}, "pub"),
        (lambda k: {"kty": "OKP", "alg": "EdDSA", "pub": public_pem(k["rsa"])}, "pub"),
        (lambda k: {"kty": "OCT", "alg": "HS256", "k": public_pem(k["rsa"])}, "k"),
        (lambda k: {"kty": "OCT", "alg": "HS256", "k": public_pem(k["p256"])}, "k"),
        (lambda k: {"kty": "OCT", "alg": "HS256", "k": ""}, "k"),
        (lambda k: {"kty": "OCT", "alg": "HS256", "format": "PEM", "k": SECRET.decode()}, "format"),
        (lambda k: {"kty": "RSA", "alg": "RS256", "format": "plain", "pub": public_pem(k["rsa"])}, "format"),
        (lambda k: {"kty": "RSA", "alg": "RS256", "pub": public_pem(k["rsa"]), "kid": ""}, "kid"),
        (lambda k: {"kty": "RSA", "alg": "RS256", "pub": public_pem(k["rsa"]), "kid": "x" * 257}, "kid"),
        (lambda k: {"kty": "RSA", "alg": "RS256", "pub": public_pem(k["rsa"]), "kid": 7}, "kid"),
        (lambda k: {"kty": "RSA", "alg": "RS256", "pub": public_pem(k["rsa"]), "x5u": "https://evil"}, "x5u"),
    ],
)
def test_bad_static_keys_name_the_field(keys: dict[str, Any], make_raw: Any, field: str) -> None:
    with pytest.raises(BadKey) as caught:
        load_static_key(make_raw(keys))
    assert caught.value.field == field
    assert caught.value.message
    assert str(caught.value).startswith(f"{field} ")


def test_ssh_public_key_is_not_an_hmac_secret(keys: dict[str, Any]) -> None:
    ssh = keys["rsa"].public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    with pytest.raises(BadKey) as caught:
        load_static_key({"kty": "OCT", "alg": "HS256", "k": ssh.decode()})
    assert caught.value.field == "k"


# --------------------------------------------------------------------------- load_jwk


def test_rsa_jwk_without_alg_allows_exactly_the_rsa_family(keys: dict[str, Any]) -> None:
    key = load_jwk({**public_jwk(keys["rsa"]), "kid": "r1"})
    assert key is not None
    assert key.algorithms == frozenset(RSA_ALGS)
    assert key.kid == "r1"
    assert_public_only(key)


@pytest.mark.parametrize("alg", sorted(RSA_ALGS))
def test_rsa_jwk_with_alg_allows_only_that_alg(keys: dict[str, Any], alg: str) -> None:
    key = load_jwk({**public_jwk(keys["rsa"]), "alg": alg, "use": "sig"})
    assert key is not None
    assert key.algorithms == frozenset({alg})


@pytest.mark.parametrize(("name", "alg"), [("p256", "ES256"), ("p384", "ES384"), ("p521", "ES512")])
def test_ec_jwk_alg_follows_the_curve(keys: dict[str, Any], name: str, alg: str) -> None:
    key = load_jwk(public_jwk(keys[name]))
    assert key is not None
    assert key.algorithms == frozenset({alg})
    assert_public_only(key)
    with_alg = load_jwk({**public_jwk(keys[name]), "alg": alg})
    assert with_alg is not None
    assert with_alg.algorithms == frozenset({alg})


def test_okp_jwk_is_eddsa(keys: dict[str, Any]) -> None:
    key = load_jwk(public_jwk(keys["ed"]))
    assert key is not None
    assert key.algorithms == frozenset({"EdDSA", "Ed25519"})  # Ed25519 is RFC 9864's fully specified name
    assert_public_only(key)
    with_alg = load_jwk({**public_jwk(keys["ed"]), "alg": "EdDSA"})
    assert with_alg is not None
    assert with_alg.algorithms == frozenset({"EdDSA"})


@pytest.mark.parametrize(
    ("name", "alg"),
    [
        ("rsa", "HS256"),
        ("rsa", "ES256"),
        ("rsa", "none"),
        ("rsa", "EdDSA"),
        ("rsa", "RSA-OAEP"),
        ("p256", "ES384"),
        ("p256", "ES512"),
        ("p256", "RS256"),
        ("p256", "HS256"),
        ("p384", "ES256"),
        ("ed", "ES256"),
        ("ed", "HS256"),
    ],
)
def test_jwk_whose_alg_does_not_fit_the_key_is_dropped(keys: dict[str, Any], name: str, alg: str) -> None:
    assert load_jwk({**public_jwk(keys[name]), "alg": alg}) is None


@pytest.mark.parametrize("name", ["rsa", "p256", "ed"])
def test_encryption_jwk_is_dropped(keys: dict[str, Any], name: str) -> None:
    assert load_jwk({**public_jwk(keys[name]), "use": "enc"}) is None


@pytest.mark.parametrize(
    "jwk",
    [
        {"kty": "oct", "k": b64url(SECRET)},
        {"kty": "oct", "k": b64url(SECRET), "alg": "HS256", "use": "sig"},
        {"kty": "OCT", "k": b64url(SECRET)},
    ],
)
def test_symmetric_jwk_in_a_jwks_is_dropped(jwk: dict[str, Any]) -> None:
    assert load_jwk(jwk) is None


@pytest.mark.parametrize("name", ["rsa", "p256", "p384", "ed"])
def test_jwk_with_private_material_is_never_a_signing_key(keys: dict[str, Any], name: str) -> None:
    jwk = private_jwk(keys[name])
    assert "d" in jwk
    # The code drops such keys entirely; whatever it returns must not hold the private key.
    key = load_jwk(jwk)
    assert key is None


@pytest.mark.parametrize(
    "jwk",
    [
        {},
        {"kty": "RSA"},
        {"kty": "RSA", "n": "!!!", "e": "AQAB"},
        {"kty": "RSA", "n": ["a"], "e": "AQAB"},
        {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"},
        {"kty": "EC", "crv": "P-999", "x": "AA", "y": "AA"},
        {"kty": "OKP", "crv": "X25519", "x": b64url(b"\x01" * 32)},
        {"kty": "OKP", "crv": "Ed25519"},
        {"kty": "DSA", "y": "AA"},
        {"kty": 5},
    ],
)
def test_malformed_jwk_is_dropped(jwk: dict[str, Any]) -> None:
    assert load_jwk(jwk) is None


@pytest.mark.parametrize("alg", [["RS256"], {"RS256": True}])
def test_jwk_with_non_string_alg_is_dropped_not_a_crash(keys: dict[str, Any], alg: Any) -> None:
    assert load_jwk({**public_jwk(keys["rsa"]), "alg": alg}) is None


def test_secp256k1_jwk_is_dropped() -> None:
    jwk = json.loads(ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256K1()).public_key()))
    assert load_jwk(jwk) is None


@pytest.mark.parametrize("kid", [7, "k" * 257, ["a"]])
def test_jwk_with_bad_kid_is_dropped(keys: dict[str, Any], kid: Any) -> None:
    assert load_jwk({**public_jwk(keys["rsa"]), "kid": kid}) is None


def test_jwk_kid_at_the_length_cap_is_kept(keys: dict[str, Any]) -> None:
    key = load_jwk({**public_jwk(keys["rsa"]), "kid": "k" * 256})
    assert key is not None
    assert key.kid == "k" * 256


# --------------------------------------------------------------------------- VerificationKey.verify


def _loaded(keys: dict[str, Any], alg: str, how: str) -> VerificationKey:
    name = ASYMMETRIC[alg][0]
    if how == "static":
        return load_static_key({"kty": KTY[name], "alg": alg, "pub": public_pem(keys[name])})
    loaded = load_jwk(public_jwk(keys[name]))
    assert loaded is not None
    return loaded


@pytest.mark.parametrize("how", ["static", "jwk"])
@pytest.mark.parametrize("alg", sorted(ASYMMETRIC))
def test_verify_asymmetric(keys: dict[str, Any], alg: str, how: str) -> None:
    name, other = ASYMMETRIC[alg]
    key = _loaded(keys, alg, how)
    signing_input, signature = sign(alg, keys[name])

    assert key.verify(alg, signing_input, signature) is True
    # Another alg name, even one of the same family the key may verify.
    for wrong in {"RS256", "PS256", "ES256", "EdDSA", "HS256", "none", "rs256", ""} - {alg}:
        assert key.verify(wrong, signing_input, signature) is False, wrong
    # A signature made by another key of the same kind.
    assert key.verify(alg, *sign(alg, keys[other])) is False
    # Truncated, extended, flipped, garbage, empty.
    assert key.verify(alg, signing_input, signature[:-1]) is False
    assert key.verify(alg, signing_input, signature[: len(signature) // 2]) is False
    assert key.verify(alg, signing_input, signature + b"\x00") is False
    assert key.verify(alg, signing_input, bytes([signature[0] ^ 1]) + signature[1:]) is False
    assert key.verify(alg, signing_input, b"garbage" * 40) is False
    assert key.verify(alg, signing_input, b"") is False
    # The signature does not cover another payload.
    assert key.verify(alg, signing_input + b"x", signature) is False


def test_rsa_jwk_without_alg_verifies_every_rsa_alg_only_under_its_own_name(keys: dict[str, Any]) -> None:
    key = load_jwk(public_jwk(keys["rsa"]))
    assert key is not None
    for alg in sorted(RSA_ALGS):
        signing_input, signature = sign(alg, keys["rsa"])
        assert key.verify(alg, signing_input, signature) is True
        for other in RSA_ALGS - {alg}:
            assert key.verify(other, signing_input, signature) is False, (alg, other)


@pytest.mark.parametrize("alg", sorted(HMAC_ALGS))
def test_verify_hmac(alg: str) -> None:
    key = load_static_key({"kty": "OCT", "alg": alg, "k": SECRET.decode()})
    signing_input, signature = sign(alg, SECRET)
    assert key.verify(alg, signing_input, signature) is True
    for wrong in HMAC_ALGS - {alg} | {"none", "RS256"}:
        assert key.verify(wrong, signing_input, signature) is False
    assert key.verify(alg, *sign(alg, OTHER_SECRET)) is False
    assert key.verify(alg, signing_input, signature[:-1]) is False
    assert key.verify(alg, signing_input, b"garbage") is False
    assert key.verify(alg, signing_input, b"") is False


def test_hmac_key_helper_covers_the_hmac_family() -> None:
    key = hmac_key(SECRET, kid="h")
    assert key.algorithms == frozenset(HMAC_ALGS)
    assert key.kid == "h"
    for alg in sorted(HMAC_ALGS):
        assert key.verify(alg, *sign(alg, SECRET)) is True
        assert key.verify(alg, *sign(alg, OTHER_SECRET)) is False


def test_unsigned_token_never_verifies(keys: dict[str, Any]) -> None:
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = b64url(json.dumps({"sub": "alice"}).encode())
    signing_input = f"{header}.{payload}".encode()
    for key in (hmac_key(SECRET), _loaded(keys, "RS256", "jwk"), _loaded(keys, "ES256", "static")):
        assert "none" not in key.algorithms
        assert key.verify("none", signing_input, b"") is False


# --------------------------------------------------------------------------- algorithm confusion


def _hs_token_with_public_key_as_secret(secret: bytes, digest: Any, alg: str) -> tuple[bytes, bytes]:
    header = b64url(json.dumps({"alg": alg, "typ": "JWT"}, separators=(",", ":")).encode())
    payload = b64url(json.dumps({"sub": "admin", "iss": "https://idp"}, separators=(",", ":")).encode())
    signing_input = f"{header}.{payload}".encode()
    return signing_input, hmac.new(secret, signing_input, digest).digest()


@pytest.mark.parametrize("how", ["static", "jwk"])
@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_public_key_never_verifies_an_hmac_signature_made_with_itself(keys: dict[str, Any], alg: str, how: str) -> None:
    """The classic confusion attack: HS256 keyed with the verifier's public key (in every encoding)."""
    name = ASYMMETRIC[alg][0]
    key = _loaded(keys, alg, how)
    assert not key.algorithms & HMAC_ALGS
    public = keys[name].public_key()
    secrets = [
        public_pem(keys[name]).encode(),
        public_pem(keys[name]).strip().encode(),
        public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
        json.dumps(public_jwk(keys[name])).encode(),
    ]
    if name == "rsa":
        secrets.append(public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1))
    for secret in secrets:
        for hs, digest in (("HS256", hashlib.sha256), ("HS384", hashlib.sha384), ("HS512", hashlib.sha512)):
            signing_input, signature = _hs_token_with_public_key_as_secret(secret, digest, hs)
            assert key.verify(hs, signing_input, signature) is False
            # Nor under the key's own algorithm name.
            for own in key.algorithms:
                assert key.verify(own, signing_input, signature) is False


# --------------------------------------------------------------------------- the key object


def test_verification_key_is_frozen(keys: dict[str, Any]) -> None:
    key = _loaded(keys, "RS256", "jwk")
    with pytest.raises(dataclasses.FrozenInstanceError):
        key.kid = "other"  # type: ignore[misc]  # on purpose: the assignment must be refused
    with pytest.raises(dataclasses.FrozenInstanceError):
        key.verifiers = {}  # type: ignore[misc]  # on purpose, likewise


# --------------------------------------------------------------------------- issue 16, items 7-9
# (formerly tests/unit/test_keys_hardening.py): what a key must be to be used, and how a skipped
# JWKS key is reported.
#
# - EC coordinates whose leading zero bytes were dropped (authlib does that) are read as the same
#   integer; longer ones, points off the curve and private members are refused.
# - RSA keys under 2048 bits: a config error for a static key, a skipped JWK otherwise.
# - HMAC secrets shorter than their hash: a warning per OCT key's own alg.
# - RFC 9864's `Ed25519` (and `Ed448`) next to `EdDSA`, each only on its own curve.
# - A skipped JWK is logged with its kid and a reason (never key material) and counted per fetch.

URI = "https://idp.example/jwks"
SIZES = {"P-256": 32, "P-384": 48, "P-521": 66}
CURVES: dict[str, ec.EllipticCurve] = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}
ALG_OF = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
MAX_TRIES = 4000  # P-256/P-384 need ~128 keys on average to find a short coordinate; P-521 about 2


def static(raw: dict[str, Any]) -> VerificationKey:
    return key_loading.load_static_key(static_key(raw))


def pem(public_key: Any) -> str:
    data: bytes = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return data.decode()


def minimal(value: int) -> str:
    """base64url of an integer in as few bytes as it needs (what authlib writes)."""
    return b64url(value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def sign_with(private: Any, alg: str, claims: dict[str, Any] | None = None) -> tuple[bytes, bytes]:
    """(signing input, signature) of a compact JWS with exactly this `alg` header, signed by hand."""
    header = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims or {"sub": "alice"}).encode())
    signing_input = f"{header}.{payload}".encode()
    if isinstance(private, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return signing_input, private.sign(signing_input)
    import jwt

    token = jwt.encode(claims or {"sub": "alice"}, private, algorithm=alg)
    head, body, signature = token.split(".")
    return f"{head}.{body}".encode(), base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))


def short_coordinate_key(crv: str) -> tuple[ec.EllipticCurvePrivateKey, dict[str, Any]]:
    """A key of the curve with a coordinate that encodes in fewer bytes than the curve size, and its
    JWK with both coordinates minimally encoded (bounded search: MAX_TRIES keys at most)."""
    size = SIZES[crv]
    for _ in range(MAX_TRIES):
        private = ec.generate_private_key(CURVES[crv])
        numbers = private.public_key().public_numbers()
        if min(numbers.x, numbers.y).bit_length() <= 8 * (size - 1):
            jwk = {"kty": "EC", "crv": crv, "x": minimal(numbers.x), "y": minimal(numbers.y)}
            return private, jwk
    pytest.fail(f"no {crv} key with a short coordinate in {MAX_TRIES} tries")


# --------------------------------------------------------------------------- EC coordinates (item 7)


@pytest.mark.parametrize("crv", sorted(SIZES))
def test_ec_coordinates_without_leading_zero_bytes_are_read_as_the_same_point(crv: str) -> None:
    private, jwk = short_coordinate_key(crv)
    assert min(len(base64.urlsafe_b64decode(jwk[c] + "==")) for c in ("x", "y")) < SIZES[crv]
    # PyJWT alone refuses it ("Coords should be N bytes"): this is the interop gap authlib users hit.
    with pytest.raises(Exception, match="Coords"):
        ECAlgorithm.from_jwk(jwk)
    key = load_jwk({**jwk, "kid": "short"})
    assert key is not None
    assert key.kid == "short"
    assert key.algorithms == frozenset({ALG_OF[crv]})
    assert key.verify(ALG_OF[crv], *sign_with(private, ALG_OF[crv]))
    # The same key written at full size is the same key (same fingerprint: no spurious rotation).
    full = load_jwk(json.loads(ECAlgorithm.to_jwk(private.public_key())))
    assert full is not None
    assert full.fingerprint == key.fingerprint


def test_ec_coordinates_longer_than_the_curve_are_refused() -> None:
    numbers = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
    padded = {"kty": "EC", "crv": "P-256", "x": b64url(b"\0" + numbers.x.to_bytes(32, "big")), "y": minimal(numbers.y)}
    assert read_jwk(padded) == SkippedKey(None, "bad_coordinates")


def test_an_ec_point_off_the_curve_is_refused() -> None:
    numbers = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
    off = {"kty": "EC", "crv": "P-256", "x": minimal(numbers.x), "y": minimal(numbers.y ^ 1), "kid": "off"}
    assert read_jwk(off) == SkippedKey("off", "bad_coordinates")


@pytest.mark.parametrize("crv", sorted(SIZES))
def test_a_private_ec_jwk_is_never_used_even_with_short_coordinates(crv: str) -> None:
    private, jwk = short_coordinate_key(crv)
    d = private.private_numbers().private_value
    for encoded in (minimal(d), b64url(d.to_bytes(SIZES[crv], "big"))):
        assert read_jwk({**jwk, "d": encoded, "kid": "leak"}) == SkippedKey("leak", "private_key")


@pytest.mark.parametrize(
    ("jwk", "reason"),
    [
        ({"kty": "EC", "crv": "P-256", "x": "AA", "y": None}, "malformed"),
        ({"kty": "EC", "crv": "P-256", "x": "A+A/", "y": "AA"}, "malformed"),  # base64, not base64url
        ({"kty": "EC", "crv": "P-256", "x": "AAA=", "y": "AA"}, "malformed"),  # padding
        ({"kty": "EC", "crv": "P-256", "x": "AAAA\n", "y": "AA"}, "malformed"),  # a trailing newline
        ({"kty": "EC", "crv": ["P-256"], "x": "AA", "y": "AA"}, "unsupported_curve"),
        ({"kty": "EC", "crv": "secp256k1", "x": "AA", "y": "AA"}, "unsupported_curve"),
    ],
)
def test_unreadable_ec_jwks_are_refused_with_a_reason(jwk: dict[str, Any], reason: str) -> None:
    assert read_jwk(jwk) == SkippedKey(None, reason)


# --------------------------------------------------------------------------- skip reasons


def _rsa_jwk(bits: int = 2048) -> dict[str, Any]:
    return dict(RSAAlgorithm.to_jwk(rsa.generate_private_key(65537, bits).public_key(), as_dict=True))


@pytest.fixture(scope="module")
def rsa_jwk() -> dict[str, Any]:
    return _rsa_jwk()


@pytest.mark.parametrize(
    ("extra", "reason", "expected"),
    [
        ({"use": "enc"}, "not_for_signing", True),
        ({"alg": "RSA-OAEP"}, "not_for_signing", True),  # Keycloak's encryption key, without `use`
        ({"alg": "RSA-OAEP-256", "use": "enc"}, "not_for_signing", True),
        ({"alg": "RSA1_5"}, "not_for_signing", True),
        ({"alg": "ES256"}, "alg_mismatch", False),
        ({"alg": "HS256"}, "alg_mismatch", False),
        ({"alg": "none"}, "alg_mismatch", False),
        ({"alg": ["RS256"]}, "alg_mismatch", False),
        ({"d": "AQAB"}, "private_key", False),
        ({"p": "AQAB"}, "private_key", False),
    ],
)
def test_skip_reasons(rsa_jwk: dict[str, Any], extra: dict[str, Any], reason: str, expected: bool) -> None:
    assert read_jwk({**rsa_jwk, "kid": "k", **extra}) == SkippedKey("k", reason, expected)


@pytest.mark.parametrize(
    ("jwk", "reason", "expected"),
    [
        ({"kty": "oct", "k": "c2VjcmV0", "kid": "k"}, "symmetric_key", False),
        ({"kty": "OKP", "crv": "X25519", "x": b64url(b"\1" * 32), "kid": "k"}, "not_for_signing", True),
        ({"kty": "DSA", "kid": "k"}, "unsupported_key_type", False),
        ({"kty": "RSA", "n": "!!", "e": "AQAB", "kid": "k"}, "malformed", False),
        ({"kty": "RSA", "kid": 7}, "bad_kid", False),
        ({"kty": "RSA", "kid": "k" * 257}, "bad_kid", False),
    ],
)
def test_skip_reasons_of_other_key_types(jwk: dict[str, Any], reason: str, expected: bool) -> None:
    skipped = read_jwk(jwk)
    assert isinstance(skipped, SkippedKey)
    assert (skipped.reason, skipped.expected) == (reason, expected)


# --------------------------------------------------------------------------- RSA size (item 8)


@pytest.fixture(scope="module")
def weak_rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 1024)


def test_a_1024_bit_rsa_jwk_is_skipped(weak_rsa: rsa.RSAPrivateKey) -> None:
    jwk = {**RSAAlgorithm.to_jwk(weak_rsa.public_key(), as_dict=True), "kid": "old", "alg": "RS256"}
    assert read_jwk(jwk) == SkippedKey("old", "weak_rsa_key")


def test_a_2048_bit_rsa_jwk_is_the_minimum(rsa_jwk: dict[str, Any]) -> None:
    assert MIN_RSA_BITS == 2048
    assert isinstance(read_jwk(rsa_jwk), VerificationKey)


def test_a_1024_bit_static_rsa_key_is_a_config_error_naming_the_field(weak_rsa: rsa.RSAPrivateKey) -> None:
    with pytest.raises(BadKey) as caught:
        static({"kty": "RSA", "alg": "RS256", "pub": pem(weak_rsa.public_key())})
    assert caught.value.field == "pub"
    assert "1024-bit" in caught.value.message
    assert "2048" in caught.value.message
    key = {"kty": "RSA", "alg": "RS256", "pub": pem(weak_rsa.public_key())}
    resource = {"id": "old", "type": "jwt", "jwt": {"iss": "https://x", "keys": [key]}}
    with pytest.raises(ConfigError) as error:
        validate_config({"introspectors": [resource]}, None)
    assert "introspector 'old': jwt.keys[0].pub is a 1024-bit RSA key; at least 2048 bits are required" in str(
        error.value
    )


def test_a_1024_bit_certificate_is_refused_too(weak_rsa: rsa.RSAPrivateKey) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(weak_rsa.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(weak_rsa, hashes.SHA256())
    )
    with pytest.raises(BadKey, match="1024-bit"):
        static({"kty": "RSA", "alg": "RS256", "pub": cert.public_bytes(serialization.Encoding.PEM).decode()})


# --------------------------------------------------------------------------- HMAC secret length (item 8)


def _warnings(*keys: dict[str, Any], secret: str | None = None) -> tuple[str, ...]:
    jwt: dict[str, Any] = {"iss": "https://x"}
    if secret is not None:
        jwt["secret"] = secret
    else:
        jwt["keys"] = list(keys)
    return validate_config({"introspectors": [{"id": "h", "type": "jwt", "jwt": jwt}]}, None).warnings


@pytest.mark.parametrize(("alg", "minimum"), [("HS256", 32), ("HS384", 48), ("HS512", 64)])
def test_an_oct_key_shorter_than_its_hash_warns(alg: str, minimum: int) -> None:
    [warning] = _warnings({"kty": "OCT", "alg": alg, "k": "s" * (minimum - 1)})
    assert warning == (
        f"introspector 'h': jwt.keys[0].k is shorter than {minimum} bytes; use a longer random secret in production"
    )
    assert _warnings({"kty": "OCT", "alg": alg, "k": "s" * minimum}) == ()


def test_jwt_secret_keeps_the_hs256_minimum() -> None:
    # jwt.secret verifies HS256, HS384 and HS512: the SPEC's 32 bytes (HS256's hash) is the warning line.
    assert _warnings(secret="s" * 32) == ()
    assert len(_warnings(secret="s" * 31)) == 1


# --------------------------------------------------------------------------- Ed25519 / Ed448 (item 9)


@pytest.fixture(scope="module")
def ed() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def ed4() -> ed448.Ed448PrivateKey:
    return ed448.Ed448PrivateKey.generate()


def test_ed25519_jwk_without_alg_verifies_eddsa_and_ed25519(ed: ed25519.Ed25519PrivateKey) -> None:
    key = load_jwk(OKPAlgorithm.to_jwk(ed.public_key(), as_dict=True))
    assert key is not None
    assert key.algorithms == frozenset({"EdDSA", "Ed25519"})
    for alg in ("EdDSA", "Ed25519"):
        assert key.verify(alg, *sign_with(ed, alg))
    assert not key.verify("Ed448", *sign_with(ed, "Ed448"))


def test_ed25519_jwk_with_alg_ed25519_verifies_that_alg_only(ed: ed25519.Ed25519PrivateKey) -> None:
    key = load_jwk({**OKPAlgorithm.to_jwk(ed.public_key(), as_dict=True), "alg": "Ed25519", "kid": "e"})
    assert key is not None
    assert key.algorithms == frozenset({"Ed25519"})
    assert key.verify("Ed25519", *sign_with(ed, "Ed25519"))
    # A JWK that names its alg verifies that name only (as for every other kind of key).
    assert not key.verify("EdDSA", *sign_with(ed, "EdDSA"))


def test_an_ed448_key_never_verifies_ed25519(ed4: ed448.Ed448PrivateKey) -> None:
    jwk = OKPAlgorithm.to_jwk(ed4.public_key(), as_dict=True)
    key = load_jwk(jwk)
    assert key is not None
    assert key.algorithms == frozenset({"EdDSA", "Ed448"})
    assert key.verify("Ed448", *sign_with(ed4, "Ed448"))
    assert key.verify("EdDSA", *sign_with(ed4, "EdDSA"))
    assert not key.verify("Ed25519", *sign_with(ed4, "Ed25519"))
    assert read_jwk({**jwk, "alg": "Ed25519", "kid": "x"}) == SkippedKey("x", "alg_mismatch")


def test_static_okp_keys_take_the_fully_specified_names(
    ed: ed25519.Ed25519PrivateKey, ed4: ed448.Ed448PrivateKey
) -> None:
    key = static({"kty": "OKP", "alg": "Ed25519", "pub": pem(ed.public_key())})
    assert key.algorithms == frozenset({"Ed25519"})
    assert key.verify("Ed25519", *sign_with(ed, "Ed25519"))
    assert static({"kty": "OKP", "alg": "Ed448", "pub": pem(ed4.public_key())}).verify(
        "Ed448", *sign_with(ed4, "Ed448")
    )
    with pytest.raises(BadKey, match="is not a key for Ed25519"):
        static({"kty": "OKP", "alg": "Ed25519", "pub": pem(ed4.public_key())})
    with pytest.raises(BadKey, match="is not a key for Ed448"):
        static({"kty": "OKP", "alg": "Ed448", "pub": pem(ed.public_key())})


def test_verifiable_algorithms_hold_no_unsigned_or_encryption_alg() -> None:
    assert {"none", "None", "NONE", "", "RSA-OAEP", "ES256K", "dir"}.isdisjoint(VERIFIABLE_ALGORITHMS)
    assert {"Ed25519", "Ed448", "EdDSA", "RS256", "PS512", "ES512", "HS384"} <= VERIFIABLE_ALGORITHMS


# --------------------------------------------------------------------------- reporting skipped keys


def test_parse_jwks_reports_every_skipped_key_even_when_none_is_usable(weak_rsa: rsa.RSAPrivateKey) -> None:
    weak = {**RSAAlgorithm.to_jwk(weak_rsa.public_key(), as_dict=True), "kid": "old"}
    seen: list[SkippedKey] = []
    with pytest.raises(UpstreamUnavailable) as caught:
        parse_jwks({"keys": [weak, "junk"]}, seen.append)
    assert caught.value.outcome == "no_usable_keys"
    assert seen == [SkippedKey("old", "weak_rsa_key"), SkippedKey(None, "malformed")]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records() -> Any:
    handler = _Records()
    logger = logging.getLogger("authz_service.tokens.jwks")
    logger.addHandler(handler)
    yield handler.records
    logger.removeHandler(handler)


async def test_a_skipped_key_is_logged_with_kid_and_reason_and_counted(
    weak_rsa: rsa.RSAPrivateKey, rsa_jwk: dict[str, Any], records: list[logging.LogRecord]
) -> None:
    weak = {**RSAAlgorithm.to_jwk(weak_rsa.public_key(), as_dict=True), "kid": "old", "use": "sig"}
    enc = {**rsa_jwk, "kid": "enc", "use": "enc"}
    good = {**rsa_jwk, "kid": "good"}
    counted: list[str] = []
    clock = FakeClock(0.0)
    source = JwksKeySource(
        URI, FakeIdpClient({"keys": [weak, enc, good]}), ttl=10, clock=clock, name="idp", on_skipped_key=counted.append
    )
    assert [k.kid for k in await source.keys_for("good", "RS256")] == ["good"]
    assert counted == ["weak_rsa_key"]  # the encryption key is expected, not a problem
    [record] = [r for r in records if r.levelno == logging.WARNING]
    fields = record.fields  # type: ignore[attr-defined]
    assert fields == {"introspector": "idp", "kid": "old", "reason": "weak_rsa_key"}
    # No key material in what is logged.
    text = record.getMessage() + json.dumps(fields)
    assert weak["n"] not in text
    assert weak["n"][:16] not in text

    # The next fetch of the same document counts again but does not log again.
    clock.advance(10)
    await source.keys_for("good", "RS256")
    assert counted == ["weak_rsa_key", "weak_rsa_key"]
    assert len([r for r in records if r.levelno == logging.WARNING]) == 1
    assert source.skipped == frozenset({SkippedKey("old", "weak_rsa_key")})


async def test_an_only_key_that_is_unusable_is_a_503_and_says_why(
    weak_rsa: rsa.RSAPrivateKey, records: list[logging.LogRecord]
) -> None:
    weak = {**RSAAlgorithm.to_jwk(weak_rsa.public_key(), as_dict=True), "kid": "only"}
    counted: list[str] = []
    source = JwksKeySource(URI, FakeIdpClient({"keys": [weak]}), ttl=10, name="idp", on_skipped_key=counted.append)
    with pytest.raises(UpstreamUnavailable):
        await source.keys_for("only", "RS256")
    assert counted == ["weak_rsa_key"]
    skipped = [r for r in records if r.getMessage() == "JWKS key skipped"]
    assert [r.fields["kid"] for r in skipped] == ["only"]  # type: ignore[attr-defined]


async def test_the_engine_counts_skipped_keys_in_the_metrics(weak_rsa: rsa.RSAPrivateKey) -> None:
    from authz_service.engine import build_engine
    from authz_service.tokens.cache import CacheFactory

    weak = {**RSAAlgorithm.to_jwk(weak_rsa.public_key(), as_dict=True), "kid": "old"}
    good = {**_rsa_jwk(), "kid": "good"}
    resource = {"id": "idp", "type": "jwt", "jwks_uri": URI, "jwt": {"iss": "https://idp.example"}}
    config = validate_config({"introspectors": [resource]}, None)
    assert isinstance(config.introspectors[0], JwtIntrospectorConfig)
    metrics = Metrics(CollectorRegistry())
    engine = build_engine(
        config,
        FakeIdpClient({"keys": [weak, good]}),
        CacheFactory(config.cache),
        on_skipped_key=metrics.jwks_skipped_key,
    )
    await engine.warm_up()
    sample = metrics.registry.get_sample_value(
        "authz_jwks_skipped_keys_total", {"introspector": "idp", "reason": "weak_rsa_key"}
    )
    assert sample == 1.0
