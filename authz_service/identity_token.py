"""The signed identity token (issue #23 item 3): on an allow, a JWT the service signs for the
upstream, naming the user, the policy that allowed and the introspector that vouched.

Keys are loaded once at config load; the first signs, all are published (rotation). A minted token
is reused per (identity, policy, introspector) until half its life has passed, so an allow costs a
cache lookup, not a signature. The JWKS and discovery documents are built once, for the admin
listener to serve.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from authz_service.config.fields import RESERVED_HEADERS, Fields
from authz_service.errors import ConfigError, Problem
from authz_service.lru import Lru

SIGNING_ALGORITHMS = ("ES256", "EdDSA", "RS256")
MIN_RSA_BITS = 2048  # RFC 7518 3.3
MIN_TTL, MAX_TTL, DEFAULT_TTL = 10, 86400, 300
DEFAULT_HEADER = "x-identity-token"
# As many as the allow answers envoy.ResponseBuilder keeps encoded (ALLOW_MEMO_ENTRIES), for the
# same reason: a user's requests come in bursts. One entry holds a ~500-byte token.
CACHE_ENTRIES = 4096
JWKS_PATH = "/.well-known/jwks.json"
# Claims the service writes itself: a listed claim may never replace them.
OWN_CLAIMS = frozenset({"iss", "aud", "sub", "iat", "exp", "nbf", "jti", "policy", "introspector"})
# A kid lands in a JOSE header and a JWKS as is: base64url and a few separators, bounded.
_KID = re.compile(r"^[A-Za-z0-9._~:+=-]{1,128}$")
_HEADER_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,127}$")
# What the upstream request's identity header must never replace: framing, credentials, routing,
# and what Envoy owns (x-envoy-*, x-request-id) or reads to trust a hop (x-forwarded-*, forwarded).
_FORBIDDEN_HEADERS = RESERVED_HEADERS | {"expect", "trailer", "via", "forwarded", "x-request-id", "proxy-connection"}
_FORBIDDEN_PREFIXES = ("x-envoy-", "x-forwarded-")


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One entry of `keys`: a private key that parsed and suits its alg, with its public JWK."""

    kid: str
    alg: str
    private_key: Any = field(repr=False, compare=False)  # a cryptography private key object
    public_jwk: Mapping[str, Any] = field(compare=False)  # kid, alg and use included
    # The public JWK as canonical JSON: what equality compares (key objects compare by identity).
    fingerprint: str = ""


@dataclass(frozen=True, slots=True)
class IdentityTokenConfig:
    """`response.identity_token`, validated."""

    header: str
    issuer: str
    audience: tuple[str, ...]
    ttl: int
    claims: tuple[str, ...]
    keys: tuple[SigningKey, ...]  # the first signs


def parse_identity_token(raw: Mapping[str, Any], where: str = "response") -> IdentityTokenConfig:
    """The validated `identity_token` mapping, or ConfigError naming every bad field
    (`identity_token.keys[0].private_pem`); never a key's material in a message."""
    problems: list[Problem] = []
    f = Fields(where, raw, problems, "identity_token.")
    header = _header(f, f.get("header", str, DEFAULT_HEADER))
    issuer = _issuer(f, f.get("issuer", str))
    audience = _audience(f, f.get("audience", (str, list)))
    ttl = f.int_in("ttl", DEFAULT_TTL, MIN_TTL, MAX_TTL)
    claims = _claims(f, f.get("claims", list, []))
    keys = _keys(f, f.get("keys", list))
    f.reject_unknown()
    if problems or header is None or issuer is None or audience is None or claims is None or keys is None:
        raise ConfigError(problems or [Problem(where, "identity_token", "is not valid")])
    return IdentityTokenConfig(header, issuer, audience, ttl, claims, keys)


def _header(f: Fields, value: str | None) -> str | None:
    if value is None:
        return None
    lowered = value.lower()
    if not _HEADER_NAME.match(lowered):
        f.problem("header", f"must be an HTTP header name (letters, digits, '-'), got {value!r}")
        return None
    if lowered in _FORBIDDEN_HEADERS or lowered.startswith(_FORBIDDEN_PREFIXES):
        f.problem("header", f"must not be {lowered!r}: the proxy or HTTP itself owns it")
        return None
    return lowered


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _issuer(f: Fields, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        parts = urlsplit(value)
        host = parts.hostname or ""
        _ = parts.port  # raises ValueError on a port that is no number
    except ValueError:
        parts, host = None, ""
    if (
        parts is None
        or not host
        or parts.query
        or parts.fragment
        or parts.username is not None
        or not value.isascii()
        or not value.isprintable()
        or " " in value
    ):
        f.problem("issuer", "must be an https:// URL without query, fragment or credentials")
        return None
    if parts.scheme == "https" or (parts.scheme == "http" and _loopback(host)):
        return value
    f.problem("issuer", "must be an https:// URL (http:// only on a loopback host, for a demo)")
    return None


def _audience(f: Fields, value: str | list[Any] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, str) else value
    if not values or not all(isinstance(item, str) and item.strip() for item in values):
        f.problem("audience", "must be a non-empty string or a non-empty list of non-empty strings")
        return None
    return tuple(dict.fromkeys(values))


def _claims(f: Fields, value: list[Any] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    claims: list[str] = []
    for i, claim in enumerate(value):
        if not isinstance(claim, str) or not claim:
            f.problem(f"claims[{i}]", "must be a claim name")
        elif claim in OWN_CLAIMS:
            f.problem(f"claims[{i}]", f"must not be {claim!r}: the service sets it itself")
        elif claim in claims:
            f.problem(f"claims[{i}]", f"lists {claim!r} twice")
        else:
            claims.append(claim)
    return tuple(claims) if len(claims) == len(value) else None


def _keys(f: Fields, value: list[Any] | None) -> tuple[SigningKey, ...] | None:
    if value is None:
        return None
    if not value:
        f.problem("keys", "must list at least one signing key")
        return None
    keys: list[SigningKey] = []
    kids: set[str] = set()
    ok = True
    for i, entry in enumerate(value):
        if not isinstance(entry, dict):
            f.problem(f"keys[{i}]", "must be a mapping {kid, alg, private_pem}")
            ok = False
            continue
        kf = Fields(f.where, entry, f.problems, f"{f.prefix}keys[{i}].")
        key = _key(kf)
        kf.reject_unknown()
        if key is None:
            ok = False
        elif key.kid in kids:
            kf.problem("kid", f"{key.kid!r} is used by an earlier key: kids must be unique")
            ok = False
        else:
            kids.add(key.kid)
            keys.append(key)
    return tuple(keys) if ok else None


def _key(f: Fields) -> SigningKey | None:
    kid = f.get("kid", str)
    alg = f.get("alg", str)
    pem = f.get("private_pem", str)
    if kid is not None and not _KID.match(kid):
        f.problem("kid", "must be 1 to 128 characters of letters, digits and . _ ~ : + = -")
        kid = None
    if alg is not None and alg not in SIGNING_ALGORITHMS:
        f.problem("alg", f"must be one of {', '.join(SIGNING_ALGORITHMS)}, got {alg!r}")
        alg = None
    if pem is None or kid is None or alg is None:
        return None
    try:
        private_key = load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError):  # never the error's text: it may quote the key
        f.problem("private_pem", "must be an unencrypted PEM private key")
        return None
    if alg == "ES256":
        if not isinstance(private_key, ec.EllipticCurvePrivateKey) or private_key.curve.name != "secp256r1":
            f.problem("private_pem", "must be an EC P-256 key for ES256")
            return None
        jwk = ECAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    elif alg == "EdDSA":
        if not isinstance(private_key, ed25519.Ed25519PrivateKey):
            f.problem("private_pem", "must be an Ed25519 key for EdDSA")
            return None
        jwk = OKPAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    else:
        if not isinstance(private_key, rsa.RSAPrivateKey):
            f.problem("private_pem", "must be an RSA key for RS256")
            return None
        if private_key.key_size < MIN_RSA_BITS:
            f.problem("private_pem", f"is a {private_key.key_size}-bit RSA key; at least {MIN_RSA_BITS} are required")
            return None
        jwk = RSAAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    public = {**jwk, "kid": kid, "alg": alg, "use": "sig"}
    return SigningKey(kid, alg, private_key, public, json.dumps(public, sort_keys=True))


class IdentityTokenMinter:
    """Mints the identity token of an allow, reusing one per (identity, policy, introspector) for
    half its life: the upstream always gets at least ttl/2 of validity, and a repeated identity
    costs a lookup instead of a signature."""

    def __init__(
        self,
        config: IdentityTokenConfig,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        max_entries: int = CACHE_ENTRIES,
    ) -> None:
        self.config = config
        self._clock = clock
        self._wall = wall
        signer = config.keys[0]
        self._key = signer.private_key
        self._alg = signer.alg
        self._headers = {"kid": signer.kid, "typ": "JWT"}
        self._audience: str | list[str] = config.audience[0] if len(config.audience) == 1 else list(config.audience)
        # (cache key, policy, introspector) -> (token, reuse until, on the monotonic clock)
        self._cache: Lru[tuple[Hashable, str | None, str | None], tuple[str, float]] = Lru(max_entries)
        self._jwks = json.dumps({"keys": [dict(key.public_jwk) for key in config.keys]}, separators=(",", ":")).encode()

    @property
    def header(self) -> str:
        return self.config.header

    def token_for(
        self,
        user_id: str | None,
        claims: Mapping[str, Any],
        policy: str | None,
        introspector: str | None,
        cache_key: Hashable,
        not_after: float | None = None,
    ) -> str:
        """The identity token for an allow.

        `cache_key` names the verified credential (the verified-token cache's key): the same key
        must always come with the same user id, claims and `not_after`. `not_after` (epoch
        seconds: the credential's own expiry) caps `exp`, so the token never outlives it.
        """
        key = (cache_key, policy, introspector)
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None and now < cached[1]:
            return cached[0]
        token, lifetime = self._mint(user_id, claims, policy, introspector, not_after)
        if lifetime > 0:
            self._cache.put(key, (token, now + lifetime / 2))
        else:
            self._cache.discard(key)
        return token

    def _mint(
        self,
        user_id: str | None,
        claims: Mapping[str, Any],
        policy: str | None,
        introspector: str | None,
        not_after: float | None,
    ) -> tuple[str, int]:
        config = self.config
        iat = int(self._wall())
        exp = iat + config.ttl
        if not_after is not None and math.isfinite(not_after):
            exp = min(exp, math.floor(not_after))
        payload: dict[str, Any] = {"iss": config.issuer, "aud": self._audience}
        if user_id is not None:
            payload["sub"] = user_id
        payload["iat"] = iat
        payload["exp"] = exp
        for claim in config.claims:
            value = claims.get(claim)
            if value is not None:
                payload[claim] = value
        if policy is not None:
            payload["policy"] = policy
        if introspector is not None:
            payload["introspector"] = introspector
        token = jwt.encode(payload, self._key, algorithm=self._alg, headers=self._headers)
        return token, exp - iat

    def jwks_document(self) -> bytes:
        """`/.well-known/jwks.json`: every configured key's public JWK, the signing one first."""
        return self._jwks

    def openid_configuration(self, admin_base_url: str) -> bytes:
        """`/.well-known/openid-configuration`, naming the JWKS served under `admin_base_url`."""
        return openid_configuration(self.config, admin_base_url)


def openid_configuration(config: IdentityTokenConfig, admin_base_url: str) -> bytes:
    """The discovery document (OpenID Connect Discovery 1.0 section 3) for the identity token."""
    algs = list(dict.fromkeys(key.alg for key in config.keys))
    document = {
        "issuer": config.issuer,
        "jwks_uri": admin_base_url.rstrip("/") + JWKS_PATH,
        "id_token_signing_alg_values_supported": algs,
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "claims_supported": ["iss", "aud", "sub", "iat", "exp", "policy", "introspector", *config.claims],
    }
    return json.dumps(document, separators=(",", ":")).encode()
