"""Verified tokens, remembered: SHA-256 of the token -> the identity it was shaped into.

Signature checks cost 30-250 µs per token; a hit here costs a hash and a dict lookup. It wraps
the router as CachedIntrospector wraps an opaque introspector: the introspectors know nothing
of it. An entry lives until its introspector's `trusted_until` for it (a JWT: its exp plus
leeway, or the expiry of the keys that verified it; an opaque token: its cached answer's life),
and any change of that introspector's key set (a rotation) invalidates every entry it made.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from authz_service.model import Identity
from authz_service.tokens.base import Credential, Introspector


class Routed(Protocol):
    """What the cache wraps: something that introspects, and the introspectors it routes to."""

    @property
    def members(self) -> Mapping[str, Introspector]:
        """Introspectors by id: an entry asks its own one how long it may live."""
        ...

    async def introspect(self, credential: Credential) -> Identity:
        """The identity behind the credential."""
        ...


@dataclass(frozen=True, slots=True)
class Verified:
    """One verified token: who it is, and how long that may be believed."""

    identity: Identity
    deadline: float  # epoch seconds after which the entry is dead
    introspector: Introspector
    generation: int


def token_digest(token: str) -> bytes:
    """The cache key of a token: its SHA-256 (never the token itself)."""
    return hashlib.sha256(token.encode()).digest()


class VerifiedTokens:
    """A bounded LRU of verified identities in front of the introspectors."""

    NAME = "verified"  # the cache label in metrics

    def __init__(
        self,
        inner: Routed,
        shape: Callable[[Identity], Identity],
        max_entries: int,
        clock: Callable[[], float] = time.time,
        on_event: Callable[[str, str], None] | None = None,
    ) -> None:
        self._inner = inner
        self._shape = shape  # headers built and claims trimmed once per verification, not per hit
        self.max_entries = max_entries
        self._clock = clock
        self._data: OrderedDict[bytes, Verified] = OrderedDict()
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
        if entry is not None and credential.introspector in (None, entry.identity.introspector):
            return entry.identity
        identity = self._shape(await self._inner.introspect(credential))
        introspector = self._inner.members[identity.introspector]
        deadline = introspector.trusted_until(identity)
        if deadline > self._clock():
            self._put(digest, Verified(identity, deadline, introspector, introspector.key_generation))
        return identity

    def _get(self, key: bytes) -> Verified | None:
        entry = self._data.get(key)
        if entry is not None and (
            self._clock() >= entry.deadline or entry.generation != entry.introspector.key_generation
        ):
            del self._data[key]
            entry = None
        if entry is None:
            self.misses += 1
            self._on_event(self.NAME, "miss")
            return None
        self._data.move_to_end(key)
        self.hits += 1
        self._on_event(self.NAME, "hit")
        return entry

    def _put(self, key: bytes, entry: Verified) -> None:
        self._data[key] = entry
        self._data.move_to_end(key)
        if len(self._data) > self.max_entries:
            self._data.popitem(last=False)
