"""The wiring: one validated Config in, one Engine out (introspectors, caches, Authorizer, answers).

This is the only module that knows every concrete introspector class; everything downstream sees
the Introspector protocol. A reload builds a new Engine and swaps it in one assignment; an
introspector whose config did not change is carried over as it is, so its JWKS keys and its
token cache survive, and checks in flight finish on the engine they started with.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from authz_service.config.model import (
    Config,
    IntrospectorConfig,
    JwtIntrospectorConfig,
    OpaqueIntrospectorConfig,
    ResponseConfig,
)
from authz_service.context import strip_empty
from authz_service.decide import Authorizer
from authz_service.denials import Responses
from authz_service.envoy import HttpAnswers, IdentityHeaders, ResponseBuilder
from authz_service.identity_token import JWKS_PATH, IdentityTokenConfig, IdentityTokenMinter
from authz_service.model import Identity, header_pairs
from authz_service.tokens.base import IdpClient, Introspector
from authz_service.tokens.cache import CacheFactory
from authz_service.tokens.discovery import OidcDiscovery
from authz_service.tokens.dpop import DPOP_ALGORITHMS, SenderConstraints
from authz_service.tokens.jwks import JwksKeySource
from authz_service.tokens.jwt import JwtIntrospector, StaticKeySource
from authz_service.tokens.opaque import CachedIntrospector, OpaqueIntrospector
from authz_service.tokens.router import IntrospectorRouter
from authz_service.tokens.sources import CredentialFinder
from authz_service.tokens.verified import VerifiedTokens
from authz_service.tracing import Spans

_NO_CLAIMS: Mapping[str, Any] = MappingProxyType({})


class IdentityShaper:
    """Shapes a freshly verified identity once, for every later hit: its headers, and its claims
    trimmed to what policies read (nothing at all when there are no policies)."""

    def __init__(self, response: ResponseConfig, keep_claims: bool) -> None:
        self._headers = IdentityHeaders(response)
        self._claims_header = response.claims_header
        self._keep_claims = keep_claims

    def __call__(self, identity: Identity) -> Identity:
        headers = self._headers.build(identity)  # from the full claims: claim_headers may name any
        claims = strip_empty(identity.claims) if self._keep_claims else _NO_CLAIMS
        return dataclasses.replace(identity, claims=claims, headers=headers)

    def unshaped(self, identity: Identity) -> Identity | None:
        """The full claims again, from the claims header this shaper built (None when they were
        too large for one): a reload that changes shaping reshapes kept entries instead of
        asking the IdP again."""
        for name, value in header_pairs(identity.headers):
            if name == self._claims_header:
                claims = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
                return dataclasses.replace(identity, claims=claims, headers=())
        return None


@dataclass(frozen=True, slots=True)
class Built:
    """One introspector as built from its config (kept to compare configs on reload)."""

    config: IntrospectorConfig
    introspector: Introspector
    jwks: JwksKeySource | None = None


@dataclass(frozen=True, slots=True)
class Readiness:
    """Whether an engine can verify every introspector's tokens, and what each one lacks."""

    ready: bool  # every introspector not marked `optional` has keys (static, opaque: at once)
    introspectors: Mapping[str, str]  # id -> "ready", or why not ("no keys yet: http_404 from <url>")


@dataclass(frozen=True, slots=True)
class Engine:
    """Everything built from one config; swapped as a whole on reload."""

    config: Config
    authorizer: Authorizer
    responses: ResponseBuilder  # gRPC answers
    http_answers: HttpAnswers  # HTTP-mode answers, from the same table
    verified: VerifiedTokens
    built: Mapping[str, Built]
    # `response.identity_token`'s signer (None: not configured), and what the admin listener serves
    # under /.well-known/ (jwks.json, openid-configuration), built once here.
    minter: IdentityTokenMinter | None = None
    well_known: Mapping[str, bytes] = dataclasses.field(default_factory=dict)
    spans: Spans | None = None  # the process's span exporter; None unless tracing.otlp_endpoint is set

    @property
    def introspectors(self) -> Mapping[str, Introspector]:
        """Introspectors by id."""
        return {ident: b.introspector for ident, b in self.built.items()}

    async def warm_up(self) -> None:
        """Fetch every JWKS that has no keys yet, so first requests do not wait (failures retry later)."""
        sources = [b.jwks for b in self.built.values() if b.jwks is not None and b.jwks.keyset is None]
        await asyncio.gather(*(source.warm_up() for source in sources))

    def retry_missing_keys(self) -> None:
        """Every JWKS without keys fetches again in the background, with backoff, until they arrive."""
        for b in self.built.values():
            if b.jwks is not None:
                b.jwks.retry_in_background()

    def stop_retries(self, successor: Engine | None = None) -> None:
        """Stop the retries of the key sources `successor` (the engine that replaces this one) does not keep."""
        kept = {b.jwks for b in successor.built.values() if b.jwks is not None} if successor is not None else set()
        for b in self.built.values():
            if b.jwks is not None and b.jwks not in kept:
                b.jwks.stop_retrying()

    def keys_pending(self) -> list[JwksKeySource]:
        """The key sources readiness waits for: no keys yet, and their introspector is not `optional`."""
        return [
            b.jwks
            for b in self.built.values()
            if b.jwks is not None and b.jwks.keyset is None and not b.config.optional
        ]

    def readiness(self) -> Readiness:
        """Every introspector's state, as /readyz reports it."""
        states: dict[str, str] = {}
        for ident, b in self.built.items():
            if b.jwks is None:
                states[ident] = "ready"  # static keys or an opaque introspector: nothing to fetch first
            elif b.jwks.keyset is None and b.config.optional:
                states[ident] = f"{b.jwks.status()} (optional: readiness does not wait for it)"
            else:
                states[ident] = b.jwks.status()
        return Readiness(not self.keys_pending(), states)

    def jwks_staleness(self) -> dict[str, float]:
        """Seconds past cache_ttl of the keys each JWKS introspector serves."""
        return {ident: b.jwks.staleness() for ident, b in self.built.items() if b.jwks is not None}


def build_engine(
    config: Config,
    client: IdpClient,
    caches: CacheFactory,
    previous: Engine | None = None,
    on_cache_event: Callable[[str, str], None] | None = None,
    on_skipped_key: Callable[[str, str], None] | None = None,
    spans: Spans | None = None,
) -> Engine:
    """The Engine for a config, reusing the unchanged introspectors of `previous`.

    `on_skipped_key(introspector, reason)` counts the unusable keys of fetched JWKS documents
    (metrics.Metrics.jwks_skipped_key). `spans`: the process's exporter (tracing.Spans), kept
    by the engine only when it exports, so a Check without tracing pays one None check."""
    built = build_introspectors(config, client, caches, previous.built if previous else None, on_skipped_key)
    router = IntrospectorRouter(
        [b.introspector for b in built.values()],
        accepts_jwt=[c.id for c in config.introspectors if isinstance(c, OpaqueIntrospectorConfig) and c.accepts_jwt],
    )
    # Verified identities survive a reload: entries of replaced introspectors are dropped on their
    # next lookup, and entries shaped for another response config or policy set are reshaped.
    token_config = config.response.identity_token
    minter = _minter(token_config, previous)
    verified = VerifiedTokens(
        router,
        # The identity token copies its listed claims and is capped by `exp`: kept without policies too.
        IdentityShaper(config.response, keep_claims=bool(config.policies) or minter is not None),
        config.cache.max_entries,
        on_event=on_cache_event,
        entries=previous.verified.carried_over() if previous is not None else None,
        # A hit pokes its introspector's due key refresh: tokens served from memory keep keys fresh.
        key_refresh={ident: b.jwks for ident, b in built.items() if b.jwks is not None},
    )
    credentials = CredentialFinder(config.introspectors)
    senders_config = config.sender_constraints
    dpop_algorithms = frozenset(senders_config.algorithms) or DPOP_ALGORITHMS
    dpop_algs = " ".join(sorted(dpop_algorithms))  # advertised in DPoP challenges (RFC 9449 7.1)
    senders = SenderConstraints(
        caches.replay_cache(senders_config.replay_max_entries),
        window=senders_config.proof_window,
        leeway=senders_config.proof_leeway,
        algorithms=dpop_algorithms,
        certificate_header=senders_config.client_certificate_header,
    )
    authorizer = Authorizer(
        credentials,
        verified,
        config.policies,
        config.users,
        config.roles,
        authentication_only=config.authentication_only,
        senders=senders,
    )
    denials = config.responses if isinstance(config.responses, Responses) else None
    responses = ResponseBuilder(
        config.response, remove_params=credentials.token_params, denials=denials, minter=minter, dpop_algs=dpop_algs
    )
    http_answers = HttpAnswers(config.response, denials=denials, minter=minter, dpop_algs=dpop_algs)
    return Engine(
        config,
        authorizer,
        responses,
        http_answers,
        verified,
        MappingProxyType(built),
        minter,
        _well_known(minter),
        spans if spans is not None and spans.enabled else None,
    )


def _minter(token_config: object, previous: Engine | None) -> IdentityTokenMinter | None:
    """The identity token's minter: the previous engine's when the block did not change (its
    cache of minted tokens survives a reload), else a new one; None when not configured."""
    if not isinstance(token_config, IdentityTokenConfig):
        return None
    if previous is not None and previous.minter is not None and previous.minter.config == token_config:
        return previous.minter
    return IdentityTokenMinter(token_config)


def well_known_documents(config: Config) -> Mapping[str, bytes]:
    """The /.well-known/ documents of a config (a supervisor's admin listener, which has no engine)."""
    return _well_known(_minter(config.response.identity_token, None))


def _well_known(minter: IdentityTokenMinter | None) -> Mapping[str, bytes]:
    """The documents the admin listener serves for verifiers: the public keys, and the discovery
    document whose jwks_uri is under the issuer (the URL the admin listener is reached at)."""
    if minter is None:
        return MappingProxyType({})
    return MappingProxyType(
        {
            JWKS_PATH: minter.jwks_document(),
            "/.well-known/openid-configuration": minter.openid_configuration(minter.config.issuer),
        }
    )


def build_introspectors(
    config: Config,
    client: IdpClient,
    caches: CacheFactory,
    previous: Mapping[str, Built] | None = None,
    on_skipped_key: Callable[[str, str], None] | None = None,
) -> dict[str, Built]:
    """One introspector per configured resource, in config order, with its key source or cache."""
    built: dict[str, Built] = {}
    for item in config.introspectors:
        old = (previous or {}).get(item.id)
        if old is not None and old.config == item:
            built[item.id] = old
        elif isinstance(item, JwtIntrospectorConfig):
            static = StaticKeySource.from_config(item)
            if static is not None:
                built[item.id] = Built(item, JwtIntrospector(item, static))
            else:
                # Config validation guarantees one key source: jwks_uri or discovery.
                location = item.jwks_uri or OidcDiscovery(item.iss, client, item.timeout)
                jwks = JwksKeySource(
                    location,
                    client,
                    ttl=item.cache_ttl,
                    max_stale=item.max_stale,
                    timeout=item.timeout,
                    name=item.id,
                    on_skipped_key=functools.partial(on_skipped_key, item.id) if on_skipped_key else None,
                )
                built[item.id] = Built(item, JwtIntrospector(item, jwks), jwks)
        else:
            cache = caches.token_cache(item.id, item.url)
            built[item.id] = Built(item, CachedIntrospector(OpaqueIntrospector(item, client), cache))
    return built
