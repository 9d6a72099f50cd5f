"""Tests for verification keys: which algorithms a key may verify, and that it verifies only those."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from authz_service.config.validate import static_key
from authz_service.tokens import keys as key_loading
from authz_service.tokens.keys import BadKey, VerificationKey, hmac_key, load_jwk


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
