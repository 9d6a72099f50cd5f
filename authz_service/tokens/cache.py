"""The token-result cache: aiocache's API over a bounded memory backend, or aiocache's Redis backend.

Keys are SHA-256 of the token, never the token. Values are the introspection result only (JSON
for Redis). A cache that fails (Redis down, slow) is a miss, never an error: the IdP is asked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from authz_service.config.model import CacheConfig

log = logging.getLogger(__name__)


def token_key(token: str) -> str:
    """The cache key of a token: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


class CacheBackend(Protocol):
    """The part of aiocache's cache API the token cache uses (BaseCache implements it)."""

    async def get(self, key: str, default: Any = None, namespace: str | None = None) -> Any: ...

    async def set(self, key: str, value: Any, ttl: float | None = None, namespace: str | None = None) -> Any: ...

    async def close(self) -> Any: ...


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


class BoundedMemoryCache:
    """An in-process LRU with per-entry TTL on a monotonic clock, holding at most max_entries.

    It speaks aiocache's get/set API (so TokenCache treats it like the Redis backend) without
    being built on aiocache: importing aiocache imports redis-py, ~7 MB of RSS a memory-only
    service would carry for nothing. aiocache's own SimpleMemoryCache is unbounded (a flood of
    unique tokens would grow it without limit) and schedules a timer per key. Values are kept
    as compact JSON text (~60 bytes for a negative answer, against ~300 for the dict).
    """

    NAME = "bounded-memory"

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._data: OrderedDict[str, tuple[float | None, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    async def get(self, key: str, default: Any = None, namespace: str | None = None) -> Any:
        full = (namespace or "") + key
        entry = self._data.get(full)
        if entry is None:
            return default
        expires, text = entry
        if expires is not None and self._clock() >= expires:
            del self._data[full]
            return default
        self._data.move_to_end(full)
        return json.loads(text)

    async def set(self, key: str, value: Any, ttl: float | None = None, namespace: str | None = None) -> bool:
        full = (namespace or "") + key
        self._data[full] = (self._clock() + ttl if ttl else None, _dumps(value))
        self._data.move_to_end(full)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)
        return True

    async def delete(self, key: str, namespace: str | None = None) -> int:
        return 1 if self._data.pop((namespace or "") + key, None) is not None else 0

    async def exists(self, key: str, namespace: str | None = None) -> bool:
        return await self.get(key, namespace=namespace) is not None

    async def clear(self, namespace: str | None = None) -> bool:
        if namespace:
            for key in [k for k in self._data if k.startswith(namespace)]:
                del self._data[key]
        else:
            self._data.clear()
        return True

    async def close(self) -> None:
        """Nothing to release (aiocache's API has it)."""


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
        self._namespace = namespace
        self._stats = stats

    async def get(self, key: str) -> Any:
        try:
            value = await self.backend.get(key, namespace=self._namespace)
        except Exception as err:
            self._stats.count(self.name, "error")
            log.warning("cache read failed: %s", type(err).__name__, extra={"fields": {"cache": self.name}})
            return None
        self._stats.count(self.name, "miss" if value is None else "hit")
        return value

    async def set(self, key: str, value: Any, ttl: float) -> None:
        try:
            await self.backend.set(key, value, ttl=ttl, namespace=self._namespace)
        except Exception as err:
            self._stats.count(self.name, "error")
            log.warning("cache write failed: %s", type(err).__name__, extra={"fields": {"cache": self.name}})


class CacheFactory:
    """Builds the per-introspector caches for one process from the cache config."""

    def __init__(self, config: CacheConfig, on_event: Callable[[str, str], None] | None = None) -> None:
        self.config = config
        self.stats = CacheStats(on_event)
        self._redis: CacheBackend | None = None

    def token_cache(self, name: str, fingerprint: str) -> TokenCache:
        """The cache of introspector `name`; `fingerprint` changes when its endpoint does."""
        namespace = f"authz:v2:{name}:{hashlib.sha256(fingerprint.encode()).hexdigest()[:12]}:"
        if self.config.backend == "redis":
            assert self.config.url is not None  # guaranteed by config validation
            if self._redis is None:
                from authz_service.tokens.redis_cache import redis_backend  # aiocache and redis-py: only here

                self._redis = redis_backend(self.config.url)
            return TokenCache(self._redis, name, namespace, self.stats)
        # Each introspector has its own memory cache: no namespace, so keys stay 64 characters.
        return TokenCache(BoundedMemoryCache(self.config.max_entries), name, None, self.stats, keeps_active=False)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.close()
            self._redis = None
