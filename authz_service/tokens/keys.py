"""Verification keys: static keys from config and JWKs from a JWKS document.

A key carries the algorithms it may verify, fixed when it is loaded. The token's `alg` header
only selects among those; it never widens them (no `none`, no HMAC with a public key).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key
from jwt.algorithms import Algorithm, ECAlgorithm, OKPAlgorithm, RSAAlgorithm, get_default_algorithms
from jwt.exceptions import InvalidKeyError

from authz_service.config.model import StaticKey
from authz_service.errors import AuthzError

ALGORITHMS: Mapping[str, Algorithm] = {name: algo for name, algo in get_default_algorithms().items() if name != "none"}
RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
HMAC_ALGS = frozenset({"HS256", "HS384", "HS512"})
EC_ALG_BY_CURVE = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
EC_ALGS = frozenset(EC_ALG_BY_CURVE.values())
OKP_ALGS = frozenset({"EdDSA"})
MAX_KID_LENGTH = 256


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
        name = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}.get(public_key.curve.name)
        return frozenset([EC_ALG_BY_CURVE[name]]) if name else frozenset()
    if isinstance(public_key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return OKP_ALGS
    return frozenset()


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


def load_jwk(jwk: Mapping[str, Any]) -> VerificationKey | None:
    """A signing key from a JWKS document, or None for keys we must not use (enc, oct, unknown)."""
    kty = jwk.get("kty")
    use = jwk.get("use")
    if use is not None and use != "sig":
        return None
    kid = jwk.get("kid")
    if kid is not None and (not isinstance(kid, str) or len(kid) > MAX_KID_LENGTH):
        return None
    public_key: Any
    try:
        if kty == "RSA":
            public_key = RSAAlgorithm.from_jwk(dict(jwk))
        elif kty == "EC":
            public_key = ECAlgorithm.from_jwk(dict(jwk))
        elif kty == "OKP":
            public_key = OKPAlgorithm.from_jwk(dict(jwk))
        else:
            # Symmetric keys have no business in a published key set.
            return None
    except (InvalidKeyError, ValueError, TypeError, KeyError):
        return None
    if not isinstance(
        public_key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)
    ):
        return None  # a JWKS that publishes private keys is not trusted with them either
    allowed = _algs_for_public_key(public_key)
    alg = jwk.get("alg")
    if alg is not None:
        if not isinstance(alg, str) or alg not in allowed:
            return None
        allowed = frozenset([alg])
    if not allowed:
        return None
    try:
        key = _prepared(public_key, allowed, "jwk")
    except BadKey:
        return None
    return VerificationKey(kid, key.verifiers, key.fingerprint)
