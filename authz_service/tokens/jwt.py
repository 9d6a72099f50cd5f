"""JWT verification: signature with configured keys only, explicit claim checks.

The compact form is parsed by `tokens.jws` (strict base64url, duplicate-key-rejecting JSON); we
verify with PyJWT's algorithm objects over `cryptography`. That keeps every guarantee PyJWT's
decode gives while letting the issuer pick the introspector before any key is looked up, and
it rejects what PyJWT accepts silently (duplicate claims, `crit`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from authz_service.config.model import JwtIntrospectorConfig
from authz_service.errors import TokenRejected
from authz_service.model import Identity, Reason
from authz_service.tokens.base import Credential
from authz_service.tokens.dpop import confirmation_of
from authz_service.tokens.jws import ParsedJwt, parse_jwt
from authz_service.tokens.keys import (
    VERIFIABLE_ALGORITHMS,
    VerificationKey,
    hmac_key,
    load_static_key,
)

# 9999-12-31T23:59:59Z: a NumericDate past it is not a date but a way to say "never" (an `exp` 26
# digits long), so `exp`, `nbf` and `iat` beyond it make the claims malformed.
MAX_NUMERIC_DATE = 253_402_300_799


def _is_number(value: Any) -> bool:
    # strictjson already refuses NaN/Infinity; isfinite also covers floats like 1e400.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_numeric_date(value: Any) -> bool:
    """A JSON number usable as a NumericDate: finite and not past the year 9999."""
    return _is_number(value) and value <= MAX_NUMERIC_DATE


def user_id_of(claims: Mapping[str, Any], *fallbacks: str) -> str | None:
    """`box_user` over `sub` (then any fallbacks, e.g. `username` for opaque tokens)."""
    for name in ("box_user", "sub", *fallbacks):
        value = claims.get(name)
        if isinstance(value, str) and value:
            return value
    return None


def check_claims(
    claims: Mapping[str, Any],
    *,
    issuer: str,
    audiences: frozenset[str] | None,
    leeway: float,
    now: float,
    max_lifetime: float | None = None,
) -> None:
    """Registered-claim checks from config; raise TokenRejected naming the first failure."""
    exp: float = claims.get("exp")  # type: ignore[assignment]  # checked on the next line
    if not is_numeric_date(exp):
        raise TokenRejected(Reason.BAD_CLAIMS)
    for name in ("nbf", "iat"):
        if name in claims and not is_numeric_date(claims[name]):
            raise TokenRejected(Reason.BAD_CLAIMS)
    for name in ("sub", "box_user", "jti"):
        if name in claims and not isinstance(claims[name], str):
            raise TokenRejected(Reason.BAD_CLAIMS)
    if claims.get("iss") != issuer:
        raise TokenRejected(Reason.UNTRUSTED_ISSUER)
    if exp <= now - leeway:
        raise TokenRejected(Reason.EXPIRED)
    if "nbf" in claims and claims["nbf"] > now + leeway:
        raise TokenRejected(Reason.NOT_YET_VALID)
    if "iat" in claims and claims["iat"] > now + leeway:
        raise TokenRejected(Reason.ISSUED_IN_FUTURE)
    # As Envoy's jwt_authn max_lifetime: the lifetime the issuer gave the token (exp - iat), or
    # without iat what is left of it (exp - now, our clock allowed `leeway` of skew).
    if max_lifetime is not None and (
        exp - claims["iat"] > max_lifetime if "iat" in claims else exp - now > max_lifetime + leeway
    ):
        raise TokenRejected(Reason.LIFETIME_TOO_LONG)
    if audiences is not None:
        check_audience(claims, audiences)


def check_audience(claims: Mapping[str, Any], audiences: frozenset[str]) -> None:
    """`aud` (a string or a list of strings) must name one of `audiences`; else TokenRejected(BAD_AUDIENCE)."""
    aud = claims.get("aud")
    if isinstance(aud, str):
        presented = {aud}
    elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
        presented = set(aud)
    else:
        raise TokenRejected(Reason.BAD_AUDIENCE)
    if audiences.isdisjoint(presented):
        raise TokenRejected(Reason.BAD_AUDIENCE)


def _verified(token: ParsedJwt, keys: Sequence[VerificationKey]) -> bool:
    return any(key.verify(token.alg, token.signing_input, token.signature) for key in keys)


class KeySource(Protocol):
    """Where a JWT introspector's verification keys come from."""

    @property
    def generation(self) -> int:
        """Bumped whenever the key set changes."""
        ...

    def trusted_until(self) -> float:
        """Epoch seconds until which the current keys may verify tokens (inf for static keys)."""
        ...

    async def keys_for(self, kid: str | None, alg: str) -> Sequence[VerificationKey]:
        """Candidate keys for this kid and alg; raise TokenRejected or UpstreamUnavailable."""
        ...

    async def keys_after_bad_signature(
        self, kid: str | None, alg: str, tried: Sequence[VerificationKey]
    ) -> Sequence[VerificationKey]:
        """Further candidates once `tried` all failed (a rotation the source may not have seen yet); () if none."""
        ...


class StaticKeySource:
    """Keys fixed in config (`jwt.secret` or `jwt.keys`): they never change and never expire."""

    generation = 0

    def __init__(self, keys: Sequence[VerificationKey]) -> None:
        self._keys = tuple(keys)
        self._algorithms = frozenset().union(*(k.algorithms for k in self._keys))

    @classmethod
    def from_config(cls, config: JwtIntrospectorConfig) -> StaticKeySource | None:
        """The key source for `jwt.secret` / `jwt.keys`, or None when keys come from elsewhere."""
        if config.secret is not None:
            return cls([hmac_key(config.secret)])
        if config.keys:
            return cls([load_static_key(spec) for spec in config.keys])
        return None

    def trusted_until(self) -> float:
        return math.inf

    async def keys_for(self, kid: str | None, alg: str) -> Sequence[VerificationKey]:
        if alg not in self._algorithms:
            raise TokenRejected(Reason.BAD_ALGORITHM)
        candidates = [k for k in self._keys if alg in k.verifiers and (kid is None or k.kid in (None, kid))]
        if not candidates:
            raise TokenRejected(Reason.UNKNOWN_KEY)
        return candidates

    async def keys_after_bad_signature(
        self, kid: str | None, alg: str, tried: Sequence[VerificationKey]
    ) -> Sequence[VerificationKey]:
        return ()  # configured keys change only with the config


class JwtIntrospector:
    """Verifies JWTs of one issuer: signature against its key source, then the claims."""

    def __init__(
        self,
        config: JwtIntrospectorConfig,
        key_source: KeySource,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.id = config.id
        self.issuer: str | None = config.iss
        self.key_source = key_source
        self._clock = clock

    @property
    def key_generation(self) -> int:
        return self.key_source.generation

    def trusted_until(self, identity: Identity) -> float:
        """Until the token expires (plus leeway) or the keys that verified it do, whichever is first."""
        expires = identity.expires_at + self.config.leeway if identity.expires_at is not None else 0.0
        return min(expires, self.key_source.trusted_until())

    async def introspect(self, credential: Credential) -> Identity:
        """Verify a token of this introspector's issuer; raise TokenRejected if invalid."""
        token = credential.jwt or parse_jwt(credential.token)
        if token.issuer != self.config.iss:
            # Only reachable through a bound source (the router routes by iss): refuse before any
            # key lookup, so a foreign token's kid never makes us refetch our JWKS.
            raise TokenRejected(Reason.UNTRUSTED_ISSUER)
        if token.alg not in VERIFIABLE_ALGORITHMS:
            # `none`, `None`, a JWE algorithm, a typo: no key could ever verify it, so no key source
            # is asked (a JWKS source would otherwise fetch for its unknown kid).
            raise TokenRejected(Reason.BAD_ALGORITHM)
        keys = await self.key_source.keys_for(token.kid, token.alg)
        if not _verified(token, keys):
            # Maybe a rotation hidden behind a key without kid: the source may refetch (rate-limited).
            retry = await self.key_source.keys_after_bad_signature(token.kid, token.alg, keys)
            if not _verified(token, retry):
                raise TokenRejected(Reason.BAD_SIGNATURE)
        config = self.config
        claims = token.claims
        check_claims(
            claims,
            issuer=config.iss,
            audiences=config.audiences,
            leeway=config.leeway,
            now=self._clock(),
            max_lifetime=config.max_lifetime,
        )
        # `cnf` (a DPoP key, a client certificate): kept for decide.py to check on every request.
        confirmation = confirmation_of(claims, required=config.sender_constraint == "required")
        return Identity(user_id_of(claims), claims, self.id, "jwt", float(claims["exp"]), confirmation=confirmation)
