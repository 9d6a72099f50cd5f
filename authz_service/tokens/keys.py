"""Verification keys: static keys from config and JWKs from a JWKS document.

A key carries the algorithms it may verify, fixed when it is loaded. The token's `alg` header
only selects among those; it never widens them (no `none`, no HMAC with a public key).

What a key must be to be used at all (RFC 7518, RFC 8725 3.5): RSA keys of at least 2048 bits;
EC keys on P-256/P-384/P-521 whose point is on the curve; Ed25519/Ed448 keys; public keys only.
A published JWK that fails any of this is skipped with a short reason (`read_jwk`), never with
its key material; a static key that fails it is a config error naming the field.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key
from jwt.algorithms import Algorithm, OKPAlgorithm, RSAAlgorithm, get_default_algorithms
from jwt.exceptions import InvalidKeyError

from authz_service.config.model import StaticKey
from authz_service.errors import AuthzError

_PYJWT = get_default_algorithms()
# RFC 9864's fully specified names verify exactly what EdDSA verifies on their curve; which curve a
# key may verify is decided by `_algs_for_public_key`, so an Ed448 key never verifies `Ed25519`.
ALGORITHMS: Mapping[str, Algorithm] = {
    **{name: algo for name, algo in _PYJWT.items() if name != "none"},
    "Ed25519": _PYJWT["EdDSA"],
    "Ed448": _PYJWT["EdDSA"],
}
RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
HMAC_ALGS = frozenset({"HS256", "HS384", "HS512"})
EC_ALG_BY_CURVE = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
EC_ALGS = frozenset(EC_ALG_BY_CURVE.values())
OKP_ALGS = frozenset({"EdDSA", "Ed25519", "Ed448"})
# Every algorithm some key could ever verify: anything else (`none`, `None`, `RSA-OAEP`, typos) is
# refused before any key is looked up, so it can never make us fetch a JWKS.
VERIFIABLE_ALGORITHMS = RSA_ALGS | EC_ALGS | OKP_ALGS | HMAC_ALGS
# RFC 7518 3.2: an HMAC key at least as long as the hash output.
HMAC_MIN_BYTES: Mapping[str, int] = {"HS256": 32, "HS384": 48, "HS512": 64}
MIN_RSA_BITS = 2048  # RFC 7518 3.3 and 3.5
MAX_KID_LENGTH = 256

_EC_CURVES: Mapping[str, tuple[ec.EllipticCurve, int]] = {
    "P-256": (ec.SECP256R1(), 32),
    "P-384": (ec.SECP384R1(), 48),
    "P-521": (ec.SECP521R1(), 66),
}
_EC_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
# Members that only a private JWK has (RFC 7518 6.2.2, 6.3.2; RFC 8037 2): a key set that
# publishes them has leaked a key, and we refuse to hold on to it.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
# Key-management algorithms (JWE, RFC 7518 4): such a key is for encryption, not for signatures.
_ENCRYPTION_ALG = re.compile(r"^(RSA1_5|RSA-OAEP.*|ECDH-ES.*|A\d{3}(GCM)?KW|dir|PBES2-.*)$")
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_PUBLIC_KEY_TYPES = (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)


class BadKey(AuthzError):
    """A configured or published key cannot be used; names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field} {message}")


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A public key (or HMAC secret) with the algorithms it may verify."""

    kid: str | None
    verifiers: Mapping[str, tuple[Algorithm, Any]]  # alg -> (PyJWT algorithm, prepared key)
    # SHA-256 of the key material (public key DER, or the HMAC secret): tells a rotation that
    # keeps the kid from no change at all.
    fingerprint: str = ""

    @property
    def algorithms(self) -> frozenset[str]:
        return frozenset(self.verifiers)

    def verify(self, alg: str, signing_input: bytes, signature: bytes) -> bool:
        """True only if `alg` is one of this key's algorithms and the signature checks out."""
        verifier = self.verifiers.get(alg)
        if verifier is None:
            return False
        algorithm, key = verifier
        try:
            return bool(algorithm.verify(signing_input, key, signature))
        except (ValueError, TypeError):  # e.g. a signature of the wrong length for the curve
            return False


@dataclass(frozen=True, slots=True)
class SkippedKey:
    """A JWK of a key set that we do not use, and why: a short label, never key material."""

    kid: str | None
    reason: str
    # True when the key was never meant for signatures (`use: enc`, a JWE algorithm): skipping it
    # is normal (Keycloak publishes one) and is neither logged as a problem nor counted.
    expected: bool = False


def hmac_key(secret: bytes, kid: str | None = None, algs: frozenset[str] = HMAC_ALGS) -> VerificationKey:
    """An HMAC key for the given algorithms."""
    verifiers = {alg: (ALGORITHMS[alg], ALGORITHMS[alg].prepare_key(secret)) for alg in sorted(algs)}
    return VerificationKey(kid, verifiers, hashlib.sha256(secret).hexdigest())


def _prepared(public_key: Any, algs: frozenset[str], field: str) -> VerificationKey:
    verifiers = {}
    for alg in sorted(algs):
        try:
            verifiers[alg] = (ALGORITHMS[alg], ALGORITHMS[alg].prepare_key(public_key))
        except (InvalidKeyError, TypeError, ValueError) as err:
            raise BadKey(field, f"cannot be used with {alg}: {err}") from err
    der = public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return VerificationKey(None, verifiers, hashlib.sha256(der).hexdigest())


def _algs_for_public_key(public_key: Any) -> frozenset[str]:
    if isinstance(public_key, rsa.RSAPublicKey):
        return RSA_ALGS
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        name = _EC_CURVE_NAMES.get(public_key.curve.name)
        return frozenset([EC_ALG_BY_CURVE[name]]) if name else frozenset()
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return frozenset({"EdDSA", "Ed25519"})
    if isinstance(public_key, ed448.Ed448PublicKey):
        return frozenset({"EdDSA", "Ed448"})
    return frozenset()


def _weak_rsa(public_key: Any) -> int | None:
    """The size in bits of an RSA key too small to trust, else None."""
    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size < MIN_RSA_BITS:
        return int(public_key.key_size)
    return None


KTY_ALGORITHMS: Mapping[str, frozenset[str]] = {"RSA": RSA_ALGS, "EC": EC_ALGS, "OKP": OKP_ALGS, "OCT": HMAC_ALGS}


def load_static_key(spec: StaticKey) -> VerificationKey:
    """The verifier for one `jwt.keys` entry (its fields already checked by config validation)."""
    if spec.kty == "OCT":
        if not spec.secret:
            raise BadKey("k", "is required for kty OCT (the shared secret)")
        try:
            return hmac_key(spec.secret, spec.kid, frozenset([spec.alg]))
        except InvalidKeyError as err:
            raise BadKey("k", "looks like an asymmetric key, not an HMAC secret") from err
    if spec.pem is None or "-----BEGIN" not in spec.pem:
        raise BadKey("pub", "is required: a PEM public key or certificate")
    public_key = _load_pem_public(spec.pem)
    if spec.alg not in _algs_for_public_key(public_key):
        raise BadKey("pub", f"is not a key for {spec.alg} (kty {spec.kty})")
    bits = _weak_rsa(public_key)
    if bits is not None:
        raise BadKey("pub", f"is a {bits}-bit RSA key; at least {MIN_RSA_BITS} bits are required")
    key = _prepared(public_key, frozenset([spec.alg]), "pub")
    return VerificationKey(spec.kid, key.verifiers, key.fingerprint)


def _load_pem_public(pem: str) -> Any:
    data = pem.encode()
    if b"PRIVATE KEY" in data:
        raise BadKey("pub", "holds a private key; configure the public key only")
    try:
        if b"CERTIFICATE" in data:
            return x509.load_pem_x509_certificate(data).public_key()
        return load_pem_public_key(data)
    except ValueError as err:
        raise BadKey("pub", "is not a readable PEM public key or certificate") from err


def _b64url_bytes(value: Any) -> bytes:
    """Strict base64url (no padding, URL alphabet); ValueError otherwise."""
    if not isinstance(value, str) or not _B64URL.fullmatch(value) or len(value) % 4 == 1:
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except binascii.Error as err:
        raise ValueError("not base64url") from err


def _ec_public_key(jwk: Mapping[str, Any]) -> ec.EllipticCurvePublicKey | SkippedKey:
    """An EC public key from `crv`, `x`, `y`, accepting coordinates whose leading zero bytes were dropped.

    RFC 7518 6.2.1.2 wants each coordinate at the full size of the curve, but some libraries
    (authlib) encode the integer minimally; node `jose` and jwcrypto accept both. The value is the
    same integer either way, so the short form is read as if left-padded; a longer one is refused.
    """
    crv = jwk.get("crv")
    curve_and_size = _EC_CURVES.get(crv) if isinstance(crv, str) else None
    if curve_and_size is None:
        return SkippedKey(None, "unsupported_curve")
    curve, size = curve_and_size
    try:
        x, y = _b64url_bytes(jwk.get("x")), _b64url_bytes(jwk.get("y"))
    except ValueError:
        return SkippedKey(None, "malformed")
    if len(x) > size or len(y) > size:
        return SkippedKey(None, "bad_coordinates")
    try:
        # The point must be on the curve (invalid-curve attacks); cryptography checks that here.
        return ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve).public_key()
    except ValueError:
        return SkippedKey(None, "bad_coordinates")


def read_jwk(jwk: Mapping[str, Any]) -> VerificationKey | SkippedKey:
    """A signing key from a JWKS document, or why we do not use this entry."""
    raw_kid = jwk.get("kid")
    kid = raw_kid if isinstance(raw_kid, str) and len(raw_kid) <= MAX_KID_LENGTH else None
    if raw_kid is not None and kid is None:  # `kid: null` is read as no kid, as before
        return SkippedKey(None, "bad_kid")
    verdict = _read_jwk(jwk)
    if isinstance(verdict, SkippedKey):
        return SkippedKey(kid, verdict.reason, verdict.expected)
    return VerificationKey(kid, verdict.verifiers, verdict.fingerprint)


def _read_jwk(jwk: Mapping[str, Any]) -> VerificationKey | SkippedKey:
    kty = jwk.get("kty")
    use = jwk.get("use")
    alg = jwk.get("alg")
    if use is not None and use != "sig":
        return SkippedKey(None, "not_for_signing", expected=True)
    if isinstance(alg, str) and _ENCRYPTION_ALG.match(alg):
        return SkippedKey(None, "not_for_signing", expected=True)
    if kty == "OKP" and jwk.get("crv") in ("X25519", "X448"):
        return SkippedKey(None, "not_for_signing", expected=True)  # key agreement curves (RFC 8037 3.2)
    if kty in ("oct", "OCT"):
        return SkippedKey(None, "symmetric_key")  # symmetric keys have no business in a published key set
    if any(member in jwk for member in _PRIVATE_MEMBERS):
        return SkippedKey(None, "private_key")  # a JWKS that publishes private keys is not trusted with them
    public_key: Any
    try:
        if kty == "RSA":
            public_key = RSAAlgorithm.from_jwk(dict(jwk))
        elif kty == "EC":
            public_key = _ec_public_key(jwk)
            if isinstance(public_key, SkippedKey):
                return public_key
        elif kty == "OKP":
            public_key = OKPAlgorithm.from_jwk(dict(jwk))
        else:
            return SkippedKey(None, "unsupported_key_type")
    except (InvalidKeyError, ValueError, TypeError, KeyError, binascii.Error):
        return SkippedKey(None, "malformed")
    if not isinstance(public_key, _PUBLIC_KEY_TYPES):
        return SkippedKey(None, "private_key")
    if _weak_rsa(public_key) is not None:
        return SkippedKey(None, "weak_rsa_key")
    allowed = _algs_for_public_key(public_key)
    if alg is not None:
        if not isinstance(alg, str) or alg not in allowed:
            return SkippedKey(None, "alg_mismatch")
        allowed = frozenset([alg])
    if not allowed:
        return SkippedKey(None, "unsupported_curve")
    try:
        return _prepared(public_key, allowed, "jwk")
    except BadKey:
        return SkippedKey(None, "malformed")


def load_jwk(jwk: Mapping[str, Any]) -> VerificationKey | None:
    """A signing key from a JWKS document, or None for keys we must not use (see `read_jwk` for why)."""
    verdict = read_jwk(jwk)
    return verdict if isinstance(verdict, VerificationKey) else None
