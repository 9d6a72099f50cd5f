"""The Check path, top to bottom: credentials -> introspector -> user -> decision.

Pure apart from the awaited introspectors (which own their network and caches). Envoy's
message types never reach this module; envoy.py converts at both ends.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import re
import traceback
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from authz_service.config import Config, JwtIntrospectorConfig, OpaqueIntrospectorConfig, ResponseConfig
from authz_service.context import build_context, strip_empty
from authz_service.errors import MalformedCredentials, TokenRejected, UpstreamUnavailable
from authz_service.model import Decision, HttpRequest, Identity, Outcome, Reason
from authz_service.tokens.cache import CacheFactory
from authz_service.tokens.jwks import JwksKeySource
from authz_service.tokens.jwt import JwtIntrospector, looks_like_jwt, parse_jwt
from authz_service.tokens.opaque import CachedIntrospector, OpaqueIntrospector
from authz_service.tokens.sources import Credential, CredentialFinder
from authz_service.tokens.verified import Verified, VerifiedTokens, token_digest
from authz_service.upstream import UpstreamClient

log = logging.getLogger(__name__)

Introspector = JwtIntrospector | CachedIntrospector
_NO_CLAIMS: Mapping[str, Any] = MappingProxyType({})
MAX_HEADER_VALUE = 8192
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def header_safe(value: str) -> bool:
    """A value Envoy can put in a header: no control characters, bounded size."""
    return len(value) <= MAX_HEADER_VALUE and not _CONTROL.search(value)


def encode_claims(claims: Mapping[str, Any]) -> str:
    """base64url (no padding) of the claims as compact UTF-8 JSON."""
    raw = json.dumps(claims, separators=(",", ":"), ensure_ascii=False, sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class IdentityHeaders:
    """Turns a verified identity into the headers sent upstream (names fixed at config load)."""

    def __init__(self, response: ResponseConfig) -> None:
        self._user_id = response.user_id_header
        self._claims = response.claims_header
        self._claim_headers = response.claim_headers

    def build(self, identity: Identity) -> tuple[tuple[str, str], ...]:
        """The headers for this identity; raise TokenRejected if the user id cannot be a header."""
        headers: list[tuple[str, str]] = []
        if identity.user_id is not None:
            if not header_safe(identity.user_id):
                raise TokenRejected(Reason.BAD_CLAIMS)
            headers.append((self._user_id, identity.user_id))
        claims = encode_claims(identity.claims)
        if len(claims) <= MAX_HEADER_VALUE:
            headers.append((self._claims, claims))
        for claim, header in self._claim_headers:
            value = identity.claims.get(claim)
            if value is None:
                continue
            text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), ensure_ascii=False)
            # A claim we cannot pass safely is left out (and so removed upstream), never mangled.
            if header_safe(text):
                headers.append((header, text))
        return tuple(headers)


class Authorizer:
    """Decides one request. Built once per config; holds the introspectors and their caches."""

    def __init__(
        self,
        config: Config,
        introspectors: Sequence[Introspector],
        on_cache_event: Callable[[str, str], None] | None = None,
    ) -> None:
        self.config = config
        self.introspectors = {i.id: i for i in introspectors}
        self._by_issuer = {i.config.iss: i for i in introspectors if isinstance(i, JwtIntrospector)}
        self._opaque = tuple(i for i in introspectors if isinstance(i, CachedIntrospector))
        self._credentials = CredentialFinder([(c.cookie, c.id) for c in config.introspectors if c.cookie is not None])
        self._identity_headers = IdentityHeaders(config.response)
        self._policies = config.policies
        self._users = config.users
        self.verified = VerifiedTokens(config.cache.max_entries, on_event=on_cache_event)

    async def check(self, request: HttpRequest) -> Decision:
        """The decision for one request. Never raises: any error becomes a deny."""
        try:
            credential = self._credentials.find(request.headers)
            if credential is None:
                # Anonymous: only a policy can let it through, and then with no identity headers.
                if self._policies and self._allowed(build_context(request, None, None), None):
                    return Decision(Outcome.ALLOW, Reason.ANONYMOUS)
                return Decision(Outcome.UNAUTHENTICATED, Reason.MISSING_TOKEN)
            identity, headers = await self._authenticate(credential)
            if self._policies:
                user = self._users.get(identity.user_id) if identity.user_id is not None else None
                context = build_context(request, identity, user)
                if not self._allowed(context, identity.introspector):
                    return Decision(Outcome.FORBIDDEN, Reason.FORBIDDEN, identity)
            return Decision(Outcome.ALLOW, Reason.ALLOWED, identity, headers)
        except TokenRejected as err:
            return Decision(Outcome.UNAUTHENTICATED, err.reason)
        except MalformedCredentials as err:
            return Decision(Outcome.INVALID_REQUEST, err.reason)
        except UpstreamUnavailable:
            return Decision(Outcome.UNAVAILABLE, Reason.IDP_UNAVAILABLE)
        except Exception as err:
            log_internal_error(err)
            return Decision(Outcome.UNAVAILABLE, Reason.INTERNAL_ERROR)

    def _allowed(self, context: Mapping[str, Any], introspector: str | None) -> bool:
        """Policies are OR-ed: the first that matches allows."""
        return any(policy.allows(context, introspector) for policy in self._policies)

    async def _authenticate(self, credential: Credential) -> tuple[Identity, tuple[tuple[str, str], ...]]:
        """The identity behind a credential and its headers, from the verified cache when possible."""
        digest = token_digest(credential.token)
        cached = self.verified.get(digest)
        if cached is not None and credential.introspector in (None, cached.identity.introspector):
            return cached.identity, cached.headers
        identity = await self._verify(credential)
        if self._policies:
            identity = dataclasses.replace(identity, context_claims=strip_empty(identity.claims))
        headers = self._identity_headers.build(identity)
        introspector = self.introspectors[identity.introspector]
        deadline: float | None = None
        if isinstance(introspector, JwtIntrospector) and identity.expires_at is not None:
            deadline = min(identity.expires_at + introspector.config.leeway, introspector.keys_trusted_until())
        elif identity.trusted_until is not None:  # opaque: as long as its cached answer lives
            deadline = min(identity.trusted_until, identity.expires_at or identity.trusted_until)
        if deadline is not None:
            # Keep only what later hits use (headers, and the policy view of the claims when there
            # are policies): the raw claims would double an entry's ~1 KB.
            kept = dataclasses.replace(identity, claims=identity.context_claims or _NO_CLAIMS)
            self.verified.put(digest, Verified(kept, headers, deadline, introspector, introspector.key_generation))
        return identity, headers

    async def _verify(self, credential: Credential) -> Identity:
        token = credential.token
        if credential.introspector is not None:
            # A cookie token belongs to the introspector that named the cookie, and to no other.
            bound = self.introspectors[credential.introspector]
            if isinstance(bound, JwtIntrospector):
                return await bound.introspect(parse_jwt(token))
            return await bound.introspect_token(token)
        rejection = TokenRejected(Reason.MALFORMED)
        if looks_like_jwt(token):
            try:
                parsed = parse_jwt(token)
            except TokenRejected as err:
                rejection = err
            else:
                introspector = self._by_issuer.get(parsed.issuer) if parsed.issuer is not None else None
                if introspector is not None:
                    return await introspector.introspect(parsed)
                rejection = TokenRejected(Reason.UNTRUSTED_ISSUER)
        if rejection.reason is Reason.TOO_LARGE or not self._opaque:
            raise rejection
        return await self._introspect_opaque(token)

    async def _introspect_opaque(self, token: str) -> Identity:
        """Ask the opaque introspectors in config order; the first that finds it active wins."""
        unavailable: UpstreamUnavailable | None = None
        rejection = TokenRejected(Reason.INACTIVE)
        for introspector in self._opaque:
            try:
                return await introspector.introspect_token(token)
            except UpstreamUnavailable as err:
                unavailable = err
            except TokenRejected as err:
                rejection = err
        # Nobody vouched for it. If one could not answer, we cannot know: fail closed with 503.
        if unavailable is not None:
            raise unavailable
        raise rejection

    async def warm_up(self) -> None:
        """Fetch every JWKS that has no keys yet, so first requests do not wait (failures retry later)."""
        sources = [
            i.key_source
            for i in self.introspectors.values()
            if isinstance(i, JwtIntrospector)
            and isinstance(i.key_source, JwksKeySource)
            and i.key_source.keyset is None
        ]
        await asyncio.gather(*(source.warm_up() for source in sources))


def build_introspectors(
    config: Config,
    client: UpstreamClient,
    caches: CacheFactory,
    previous: Mapping[str, Introspector] | None = None,
) -> list[Introspector]:
    """One introspector per configured resource, with its key source or cache.

    On reload, an introspector whose config did not change is reused as it is, so its JWKS keys
    and its token cache survive.
    """
    built: list[Introspector] = []
    for item in config.introspectors:
        old = (previous or {}).get(item.id)
        if old is not None and old.config == item:
            built.append(old)
            continue
        if isinstance(item, OpaqueIntrospectorConfig):
            cache = caches.token_cache(item.id, item.url)
            built.append(CachedIntrospector(OpaqueIntrospector(item, client), cache))
            continue
        if isinstance(item, JwtIntrospectorConfig):
            source = JwtIntrospector.static_key_source(item)
            if source is None:
                assert item.jwks_uri is not None  # guaranteed by config validation
                built.append(
                    JwtIntrospector(
                        item,
                        JwksKeySource(
                            item.jwks_uri,
                            client,
                            ttl=item.cache_ttl,
                            max_stale=item.max_stale,
                            timeout=item.timeout,
                        ),
                    )
                )
            else:
                built.append(JwtIntrospector(item, source))
    return built


def log_internal_error(err: BaseException) -> None:
    """Log an unexpected error by type and stack only: its message could quote a token."""
    # Locations only, no source lines: even those could carry a literal worth keeping out of logs.
    # The innermost frames only: a deep recursion must not turn into a 60 KB log line.
    stack = traceback.extract_tb(err.__traceback__)[-8:]
    frames = " <- ".join(f"{f.filename}:{f.lineno} in {f.name}" for f in reversed(stack))
    log.error("internal error in Check: %s at %s", type(err).__name__, frames)
