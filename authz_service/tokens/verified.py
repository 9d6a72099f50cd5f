"""Verified JWTs, remembered: SHA-256 of the token -> identity and ready-made headers.

Signature checks cost 30-250 µs per token; a hit here costs a hash and a dict lookup. An entry
lives until the token's exp (+ leeway) or until the keys that verified it expire, whichever is
first; `exp` is checked again on every hit, and any change of the introspector's key set (a
rotation) invalidates every entry it made.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from authz_service.model import Identity


class KeyGeneration(Protocol):
    """What an entry needs of the introspector that verified it."""

    @property
    def key_generation(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Verified:
    """One verified token: who it is and the headers it earns."""

    identity: Identity
    headers: tuple[tuple[str, str], ...]
    deadline: float  # epoch seconds after which the entry is dead
    introspector: KeyGeneration
    generation: int


def token_digest(token: str) -> bytes:
    """The cache key of a token: its SHA-256 (never the token itself)."""
    return hashlib.sha256(token.encode()).digest()


class VerifiedTokens:
    """A bounded LRU of verified tokens."""

    NAME = "verified"  # the cache label in metrics

    def __init__(
        self,
        max_entries: int,
        clock: Callable[[], float] = time.time,
        on_event: Callable[[str, str], None] | None = None,
    ) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._data: OrderedDict[bytes, Verified] = OrderedDict()
        self._on_event = on_event or (lambda cache, event: None)
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: bytes) -> Verified | None:
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

    def put(self, key: bytes, entry: Verified) -> None:
        if entry.deadline <= self._clock():
            return
        self._data[key] = entry
        self._data.move_to_end(key)
        if len(self._data) > self.max_entries:
            self._data.popitem(last=False)
