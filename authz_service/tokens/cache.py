"""The token-result cache: our own small interface over a bounded memory map or Redis.

Keys are SHA-256 of the token, never the token. Values are the introspection result only, kept as
compact JSON text in both backends. A cache that fails (Redis down, slow) is a miss, never an
error: the IdP is asked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

from authz_service.config.model import CacheConfig
from authz_service.lru import ExactLru
from authz_service.tokens.dpop import MemoryReplayCache, RedisReplayCache, ReplayCache
from authz_service.tokens.stored import dumps

log = logging.getLogger(__name__)


def token_key(token: str) -> str:
    """The cache key of a token: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


class CacheBackend(Protocol):
    """Where a TokenCache keeps its entries (BoundedMemoryCache, or redis_cache.RedisCache)."""

    async def get(self, key: str) -> Any:
        """The value stored under key; None if there is none (or it expired)."""
        ...

    async def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Store value under key for ttl seconds (None: until evicted)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class BoundedMemoryCache:
    """An in-process LRU (lru.ExactLru) with per-entry TTL on a monotonic clock, holding at most
    max_entries.

    Not aiocache's SimpleMemoryCache, which is unbounded (a flood of unique tokens would grow it
    without limit) and schedules a timer per key; and no Redis client is imported for it (~7 MB
    of RSS a memory-only service would carry for nothing). Values are kept as compact JSON text
    (~60 bytes for a negative answer, against ~300 for the dict).
    """

    NAME = "bounded-memory"

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._data: ExactLru[str, tuple[float | None, str]] = ExactLru(max_entries)

    @property
    def max_entries(self) -> int:
        return self._data.max_entries

    def __len__(self) -> int:
        return len(self._data)

    async def get(self, key: str) -> Any:
        entry = self._data.peek(key)
        if entry is None:
            return None
        expires, text = entry
        if expires is not None and self._clock() >= expires:
            self._data.discard(key)
            return None
        self._data.touch(key)
        return json.loads(text)

    async def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        self._data.put(key, (self._clock() + ttl if ttl else None, dumps(value)))

    async def delete(self, key: str) -> int:
        held = self._data.peek(key) is not None
        self._data.discard(key)
        return 1 if held else 0

    async def exists(self, key: str) -> bool:
        return await self.get(key) is not None

    async def clear(self, namespace: str | None = None) -> None:
        """Forget every entry, or those whose key starts with `namespace`."""
        for key in [k for k in self._data if not namespace or k.startswith(namespace)]:
            self._data.discard(key)

    async def close(self) -> None:
        """Nothing to release."""


class CacheStats:
    """Hits, misses and errors per cache name, for metrics and tests."""

    def __init__(self, on_event: Callable[[str, str], None] | None = None) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self._on_event = on_event

    def count(self, cache: str, event: str) -> None:
        self.counts[(cache, event)] += 1
        if self._on_event is not None:
            self._on_event(cache, event)


class TokenCache:
    """One introspector's per-token results, namespaced so introspectors never collide.

    `keeps_active`: whether active answers are stored here too. In Redis they are (other workers
    and replicas reuse them); in memory they are not, because the verified-token cache in front of
    the introspector already holds each of them, shaped, for exactly as long (one token held once,
    issue #15): the memory cache keeps the negative answers, which the verified cache never holds.
    """

    def __init__(
        self, backend: CacheBackend, name: str, namespace: str | None, stats: CacheStats, *, keeps_active: bool = True
    ) -> None:
        self.backend = backend
        self.name = name
        self.keeps_active = keeps_active
        self._prefix = namespace or ""
        self._stats = stats

    async def get(self, key: str) -> Any:
        try:
            value = await self.backend.get(self._prefix + key)
        except Exception as err:
            self._stats.count(self.name, "error")
            log.warning("cache read failed: %s", type(err).__name__, extra={"fields": {"cache": self.name}})
            return None
        self._stats.count(self.name, "miss" if value is None else "hit")
        return value

    async def set(self, key: str, value: Any, ttl: float) -> None:
        try:
            await self.backend.set(self._prefix + key, value, ttl)
        except Exception as err:
            self._stats.count(self.name, "error")
            log.warning("cache write failed: %s", type(err).__name__, extra={"fields": {"cache": self.name}})


class CacheFactory:
    """Builds the per-introspector caches for one process from the cache config."""

    def __init__(self, config: CacheConfig, on_event: Callable[[str, str], None] | None = None) -> None:
        self.config = config
        self.stats = CacheStats(on_event)
        self._redis: CacheBackend | None = None
        self._replay: ReplayCache | None = None

    def token_cache(self, name: str, fingerprint: str) -> TokenCache:
        """The cache of introspector `name`; `fingerprint` changes when its endpoint does."""
        namespace = f"authz:v2:{name}:{hashlib.sha256(fingerprint.encode()).hexdigest()[:12]}:"
        if self.config.backend == "redis":
            assert self.config.url is not None  # guaranteed by config validation
            if self._redis is None:
                from authz_service.tokens.redis_cache import RedisCache  # redis-py: only here

                self._redis = RedisCache(self.config.url)
            return TokenCache(self._redis, name, namespace, self.stats)
        # Each introspector has its own memory cache: no namespace, so keys stay 64 characters.
        return TokenCache(BoundedMemoryCache(self.config.max_entries), name, None, self.stats, keeps_active=False)

    def replay_cache(self, max_entries: int) -> ReplayCache:
        """The DPoP replay cache (tokens/dpop.py) of this process: on the Redis of `cache.backend:
        redis` (shared by every worker and replica), else in memory, bounded. One per factory, so
        a reload does not forget the proofs already seen."""
        if self._replay is None:
            if self.config.backend == "redis":
                assert self.config.url is not None  # guaranteed by config validation
                if self._redis is None:
                    from authz_service.tokens.redis_cache import RedisCache  # redis-py: only here

                    self._redis = RedisCache(self.config.url)
                from authz_service.tokens.redis_cache import RedisCache

                assert isinstance(self._redis, RedisCache)
                self._replay = RedisReplayCache(self._redis.client)
            else:
                self._replay = MemoryReplayCache(max_entries)
        return self._replay

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.close()
            self._redis = None
