"""Verified tokens, remembered: the token's SHA-256 -> the identity it was shaped into.

Signature checks cost 30-250 µs per token; a hit here costs a hash and a dict lookup. It wraps
the router as CachedIntrospector wraps an opaque introspector: the introspectors know nothing
of it. An entry lives until its introspector's `trusted_until` for it (a JWT: its exp plus
leeway, or the expiry of the keys that verified it; an opaque token: its cached answer's life),
and any change of that introspector's key set (a rotation) invalidates every entry it made.

A hit asks no introspector, so it pokes the key source's background refresh itself once one is
due (one monotonic comparison a hit): tokens served from memory keep the keys fresh, and the
first miss after the keys' cache_ttl finds them refreshed instead of waiting for a fetch.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from authz_service.lru import Lru
from authz_service.model import Identity
from authz_service.singleflight import SingleFlight
from authz_service.tokens.base import Credential, Introspector, KeyRefresh


class Routed(Protocol):
    """What the cache wraps: something that introspects, and the introspectors it routes to."""

    @property
    def members(self) -> Mapping[str, Introspector]:
        """Introspectors by id: an entry asks its own one how long it may live."""
        ...

    async def introspect(self, credential: Credential) -> Identity:
        """The identity behind the credential."""
        ...


class Shaper(Protocol):
    """Shapes a verified identity for reuse (engine.IdentityShaper), and can undo that."""

    def __call__(self, identity: Identity) -> Identity:
        """The identity as it is kept and answered: headers built, claims trimmed."""
        ...

    def unshaped(self, identity: Identity) -> Identity | None:
        """The identity with its full claims again, from what shaping kept; None if it cannot be."""
        ...


@dataclass(frozen=True, slots=True)
class Stamp:
    """What made a cached identity, shared by all its entries: the introspector and its key
    generation (a rotation invalidates them), and the shaper (a reload that changes it reshapes them)."""

    introspector: Introspector
    generation: int
    shaper: Shaper
    keys: KeyRefresh | None = None  # the introspector's JWKS key source, poked on hits when a refresh is due


@dataclass(frozen=True, slots=True)
class Verified(Identity):
    """A verified identity as the cache keeps it: the identity itself (one object per token, 96
    bytes, rather than an entry object around an identity) and what made it. Its `answer_until`
    is the entry's deadline (epoch seconds after which it is dead): until when this answer may be
    reused is exactly what that field means, and a slot of its own would cost 16 bytes an entry."""

    stamp: Stamp | None = None


def token_digest(token: str) -> int:
    """The cache key of a token: its SHA-256 (SPEC: never the token itself), as an int.

    An int rather than the digest's bytes: at 100,000 entries its 64-byte block against the
    bytes' 80-byte one is 1.6 MB (docs/performance.md); the conversion costs ~0.1 µs a Check."""
    return int.from_bytes(hashlib.sha256(token.encode()).digest(), "big")


class VerifiedTokens:
    """A bounded LRU of verified identities in front of the introspectors."""

    NAME = "verified"  # the cache label in metrics

    def __init__(
        self,
        inner: Routed,
        shape: Shaper,
        max_entries: int,
        clock: Callable[[], float] = time.time,
        on_event: Callable[[str, str], None] | None = None,
        entries: Lru[int, Verified] | None = None,
        key_refresh: Mapping[str, KeyRefresh] | None = None,
    ) -> None:
        self._inner = inner
        self._shape = shape  # headers built and claims trimmed once per verification, not per hit
        self._clock = clock
        self._key_refresh: Mapping[str, KeyRefresh] = key_refresh or {}  # introspector id -> its JWKS key source
        # Shared with the cache of the engine this one replaces: entries of introspectors a reload
        # kept stay valid (see _get), and are reshaped when the response config or policies changed.
        self._data: Lru[int, Verified] = Lru(max_entries) if entries is None else entries
        self._data.max_entries = max_entries  # a reload may change the bound of carried entries
        self._stamps: dict[tuple[str, int], Stamp] = {}
        self._inflight: SingleFlight[tuple[int, str | None], Identity] = SingleFlight()
        self._on_event = on_event or (lambda cache, event: None)
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    async def introspect(self, credential: Credential) -> Identity:
        """The shaped identity behind a credential, from memory when it was verified recently."""
        digest = token_digest(credential.token)
        entry = self._get(digest)
        # A token bound to one introspector (its cookie) is never vouched for by another.
        if entry is not None and credential.introspector in (None, entry.introspector):
            stamp = entry.stamp
            assert stamp is not None  # every entry is stamped when it is put
            keys = stamp.keys
            if keys is not None and keys.clock() >= keys.refresh_due_at:
                keys.refresh_in_background()
            if stamp.shaper is self._shape:
                return entry
            full = stamp.shaper.unshaped(entry)
            if full is not None:
                reshaped = self._shape(full)
                new_stamp = self._stamp_for(stamp.introspector, stamp.generation)
                kept = self._kept(reshaped, entry.answer_until, new_stamp)
                self._data.replace(digest, kept)
                return kept
        # Concurrent misses for one token share one verification, cache entry included: a check
        # that arrives between an IdP answer and its entry must not ask again (single flight).
        # One waiter being cancelled (Envoy gave up) does not cancel the shared verification.
        return await self._inflight.run((digest, credential.introspector), self._verify, digest, credential)

    async def _verify(self, digest: int, credential: Credential) -> Identity:
        identity = self._shape(await self._inner.introspect(credential))
        introspector = self._inner.members[identity.introspector]
        deadline = introspector.trusted_until(identity)
        if deadline > self._clock():
            # The kept form is what this and every later check gets: the same object each time.
            kept = self._kept(identity, deadline, self._stamp_for(introspector, introspector.key_generation))
            self._data.put(digest, kept)
            return kept
        return identity

    @staticmethod
    def _kept(identity: Identity, deadline: float | None, stamp: Stamp) -> Verified:
        # Without what only the deadline needed (exp, the answer's life): fewer objects an entry.
        return Verified(
            identity.user_id,
            identity.claims,
            identity.introspector,
            identity.kind,
            None,
            deadline,
            identity.headers,
            identity.confirmation,
            stamp,
        )

    def _stamp_for(self, introspector: Introspector, generation: int) -> Stamp:
        key = (introspector.id, generation)
        stamp = self._stamps.get(key)
        if stamp is None or stamp.introspector is not introspector or stamp.shaper is not self._shape:
            keys = self._key_refresh.get(introspector.id)
            stamp = self._stamps[key] = Stamp(introspector, generation, self._shape, keys)
        return stamp

    def carried_over(self) -> Lru[int, Verified]:
        """The entries, for the cache of the engine that replaces this one on reload."""
        return self._data

    def _get(self, key: int) -> Verified | None:
        entry = self._data.peek(key)
        if entry is not None and (
            entry.answer_until is None
            or self._clock() >= entry.answer_until
            or entry.stamp is None
            or entry.stamp.generation != entry.stamp.introspector.key_generation
            # Made by an introspector a reload replaced or removed (entries outlive reloads).
            or self._inner.members.get(entry.introspector) is not entry.stamp.introspector
        ):
            self._data.discard(key)
            entry = None
        if entry is None:
            self.misses += 1
            self._on_event(self.NAME, "miss")
            return None
        self._data.touch(key)  # now the most recently used
        self.hits += 1
        self._on_event(self.NAME, "hit")
        return entry
