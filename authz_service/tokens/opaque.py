"""Opaque tokens: RFC 7662 introspection, and the cache that wraps it.

`OpaqueIntrospector` knows HTTP and RFC 7662 and nothing of caching. `CachedIntrospector` wraps
it: per-token results keyed by SHA-256 for min(cache_ttl, exp - now), single flight per token.

Client authentication (RFC 7662 2.1 -> RFC 6749 2.3.1): `client_secret_basic` form-urlencodes
the id and the secret *before* joining them with ':' and base64-encoding the pair (a secret with
':' '+' '%' or a space is otherwise read differently by a conforming server);
`client_secret_post` sends them in the form body. The endpoint refusing our credentials (401, or
`invalid_client`) is our misconfiguration: 503 `introspection_client_auth`, logged naming the
introspector (never the secret), not cached, not an outage.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote_plus

from authz_service.config.model import OpaqueIntrospectorConfig
from authz_service.errors import TokenRejected, UpstreamUnavailable
from authz_service.model import Identity, Reason
from authz_service.singleflight import SingleFlight
from authz_service.tokens.base import CLIENT_AUTH_FAILED, INVALID_TOKEN, Credential, IdpClient, IdpErrorAnswer
from authz_service.tokens.cache import TokenCache, token_key
from authz_service.tokens.dpop import confirmation_of
from authz_service.tokens.jwt import check_audience, is_numeric_date, user_id_of

log = logging.getLogger(__name__)

NEGATIVE_TTL = 10.0  # seconds an inactive answer is remembered (bounded by cache_ttl)
CLIENT_AUTH_LOG_INTERVAL = 60.0  # seconds between two "client authentication failed" lines per introspector
_INACTIVE: Mapping[str, Any] = {"active": False}


def client_secret_basic(client_id: str, client_secret: str) -> str:
    """The Authorization header of RFC 6749 2.3.1: Basic base64(urlencode(id) ':' urlencode(secret))."""
    pair = f"{quote_plus(client_id, safe='')}:{quote_plus(client_secret, safe='')}"
    return "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")


def client_credentials(config: OpaqueIntrospectorConfig) -> tuple[dict[str, str], dict[str, str]]:
    """(headers, form fields) that authenticate us to the introspection endpoint, as configured."""
    if config.client_id is None:
        return ({"Authorization": config.authorization} if config.authorization else {}), {}
    if config.client_auth == "client_secret_post":
        form = {"client_id": config.client_id}
        if config.client_secret is not None:
            form["client_secret"] = config.client_secret
        return {}, form
    return {"Authorization": client_secret_basic(config.client_id, config.client_secret or "")}, {}


class OpaqueIntrospector:
    """Asks an RFC 7662 endpoint about a token (knows nothing of caching: CachedIntrospector does)."""

    def __init__(
        self, config: OpaqueIntrospectorConfig, client: IdpClient, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.id = config.id
        self._client = client
        self._headers, self._form = client_credentials(config)
        self._clock = clock
        self._auth_failure_logged = -float("inf")

    async def fetch(self, token: str) -> Mapping[str, Any]:
        """The endpoint's answer, validated: active results, or the inactive marker."""
        try:
            answer = await self._client.post_form(
                "introspection",
                self.config.url,
                {"token": token, "token_type_hint": "access_token", **self._form},
                headers=self._headers,
                timeout=self.config.timeout,
            )
        except IdpErrorAnswer as err:
            if err.outcome == INVALID_TOKEN:
                # RFC 7662 2.2 says an invalid token is `active: false`; some servers answer
                # 400 invalid_token / unsupported_token_type instead. Either way: not this token.
                return _INACTIVE
            if err.outcome == CLIENT_AUTH_FAILED:
                self._client_auth_failed(err)
            raise
        if not isinstance(answer, dict):
            raise UpstreamUnavailable("introspection", "invalid_answer")
        active = answer.get("active")
        if active is False:
            return _INACTIVE
        if active is not True:
            # Missing or not the JSON literal true: an IdP we do not understand is an outage, not an allow.
            raise UpstreamUnavailable("introspection", "invalid_answer")
        for name in ("exp", "nbf", "iat"):
            # A number past the year 9999 is not a date ("never expires"): an answer we do not understand.
            if name in answer and not is_numeric_date(answer[name]):
                raise UpstreamUnavailable("introspection", "invalid_answer")
        return answer

    def _client_auth_failed(self, err: IdpErrorAnswer) -> None:
        """Say so, at most once a minute: an operator must fix our credentials, the IdP is up."""
        now = self._clock()
        if now - self._auth_failure_logged < CLIENT_AUTH_LOG_INTERVAL:
            return
        self._auth_failure_logged = now
        log.error(
            "introspection client authentication failed",
            extra={"fields": {"introspector": self.id, "status": err.status, "error": err.error}},
        )

    def identity(self, result: Mapping[str, Any], now: float) -> Identity:
        """The identity an active result stands for at `now`; TokenRejected if it does not."""
        if result.get("active") is not True:
            raise TokenRejected(Reason.INACTIVE)
        exp = result.get("exp")
        if exp is not None and exp <= now:
            raise TokenRejected(Reason.EXPIRED)
        nbf = result.get("nbf")
        if nbf is not None and nbf > now:
            raise TokenRejected(Reason.NOT_YET_VALID)
        for name in ("sub", "username", "box_user"):
            if name in result and not isinstance(result[name], str):
                raise TokenRejected(Reason.BAD_CLAIMS)
        if self.config.audiences is not None:
            check_audience(result, self.config.audiences)
        confirmation = confirmation_of(result, required=self.config.sender_constraint == "required")
        return Identity(
            user_id_of(result, "username"),
            result,
            self.id,
            "opaque",
            float(exp) if exp is not None else None,
            confirmation=confirmation,
        )


class CachedIntrospector:
    """An OpaqueIntrospector behind the token cache, with one upstream call per token at a time."""

    issuer = None  # opaque tokens are not routed by issuer: they are asked in config order
    key_generation = 0  # no keys: verified-token cache entries die by their deadline only

    def __init__(self, inner: OpaqueIntrospector, cache: TokenCache, clock: Callable[[], float] = time.time) -> None:
        self.inner = inner
        self.id = inner.id
        self.config = inner.config
        self.cache = cache
        self._clock = clock
        self._inflight: SingleFlight[str, Mapping[str, Any]] = SingleFlight()

    def trusted_until(self, identity: Identity) -> float:
        """As long as the cached introspection answer lives, and never past the token's exp."""
        until = identity.answer_until if identity.answer_until is not None else 0.0
        return min(until, identity.expires_at) if identity.expires_at is not None else until

    async def introspect(self, credential: Credential) -> Identity:
        """The identity the endpoint (or the cache) vouches for; TokenRejected when inactive."""
        token = credential.token
        key = token_key(token)
        entry = await self.cache.get(key)
        if not _usable(entry):
            # One caller giving up does not cancel the call the others wait for.
            entry = await self._inflight.run(key, self._load, key, token)
        identity = self.inner.identity(entry["result"], self._clock())
        return dataclasses.replace(identity, answer_until=float(entry["until"]))

    async def _load(self, key: str, token: str) -> Mapping[str, Any]:
        result = await self.inner.fetch(token)
        now = self._clock()
        ttl: float = self.config.cache_ttl
        if result.get("active") is not True:
            ttl = min(ttl, NEGATIVE_TTL)
        elif "exp" in result:
            ttl = min(ttl, float(result["exp"]) - now)
        # `until` travels with the answer (through Redis too), so no process reuses it past the
        # cache_ttl counted from the one introspection call.
        entry = {"result": result, "until": now + max(ttl, 0.0)}
        # Redis cannot hold an entry for less than a millisecond or so.
        if ttl >= 0.01 and (self.cache.keeps_active or result.get("active") is not True):
            await self.cache.set(key, entry, ttl)
        return entry


def _usable(entry: Any) -> bool:
    """A cache entry of the current shape (anything else, e.g. from an older version, is a miss)."""
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("result"), dict)
        and isinstance(entry.get("until"), (int, float))
    )
