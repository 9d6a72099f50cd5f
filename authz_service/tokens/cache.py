"""The token-result cache: aiocache's API over a bounded memory backend or Redis.

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
from typing import Any
from urllib.parse import unquote, urlsplit

from aiocache.base import BaseCache
from aiocache.serializers import BaseSerializer

from authz_service.config.model import CacheConfig

log = logging.getLogger(__name__)

REDIS_OPERATION_TIMEOUT = 0.25  # seconds; a slower cache is treated as a miss


def token_key(token: str) -> str:
    """The cache key of a token: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


class CompactJsonSerializer(BaseSerializer):  # type: ignore[misc]
    """Values as compact JSON text: ~250 bytes for a typical introspection answer, where the
    parsed dict with its own key and value strings costs ~1,100 in memory."""

    DEFAULT_ENCODING = "utf-8"

    def dumps(self, value: Any) -> str:
        return json.dumps(value, separators=(",", ":"))

    def loads(self, value: str | bytes | None) -> Any:
        return None if value is None else json.loads(value)


class BoundedMemoryCache(BaseCache):  # type: ignore[misc]
    """An in-process LRU with per-entry TTL on a monotonic clock, holding at most max_entries.

    aiocache's own SimpleMemoryCache is unbounded (a flood of unique tokens would grow it
    without limit) and schedules a timer per key; this one evicts the least recently used entry.
    """

    NAME = "bounded-memory"

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.monotonic, **kwargs: Any) -> None:
        super().__init__(serializer=CompactJsonSerializer(), timeout=None, **kwargs)
        self.max_entries = max_entries
        self._clock = clock
        self._data: OrderedDict[str, tuple[float | None, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    async def _get(self, key: str, encoding: str | None = "utf-8", _conn: Any = None) -> Any:
        entry = self._data.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires is not None and self._clock() >= expires:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    async def _set(
        self, key: str, value: Any, ttl: float | None = None, _cas_token: Any = None, _conn: Any = None
    ) -> bool:
        self._data[key] = (self._clock() + ttl if ttl else None, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)
        return True

    async def _delete(self, key: str, _conn: Any = None) -> int:
        return 1 if self._data.pop(key, None) is not None else 0

    async def _exists(self, key: str, _conn: Any = None) -> bool:
        return await self._get(key) is not None

    async def _clear(self, namespace: str | None = None, _conn: Any = None) -> bool:
        if namespace:
            for key in [k for k in self._data if k.startswith(namespace)]:
                del self._data[key]
        else:
            self._data.clear()
        return True


def redis_backend(url: str) -> BaseCache:
    """aiocache's Redis backend for a redis:// or rediss:// URL (JSON values)."""
    from aiocache import RedisCache

    class _RedisCache(RedisCache):  # type: ignore[misc]
        # aiocache 0.12 calls SETEX/PSETEX and close(), which redis-py >= 5 deprecates;
        # SET with EX/PX and aclose() are the same commands without the warnings.
        async def _set(
            self, key: str, value: Any, ttl: float | None = None, _cas_token: Any = None, _conn: Any = None
        ) -> Any:
            if _cas_token is not None or ttl is None:
                return await super()._set(key, value, ttl, _cas_token, _conn)
            return await self.client.set(key, value, px=max(1, int(ttl * 1000)))

        async def _close(self, *args: Any, _conn: Any = None, **kwargs: Any) -> None:
            await self.client.aclose()

    parts = urlsplit(url)
    db = parts.path.lstrip("/") or "0"
    return _RedisCache(
        endpoint=parts.hostname or "127.0.0.1",
        port=parts.port or 6379,
        db=int(db),
        password=unquote(parts.password) if parts.password else None,
        ssl=parts.scheme == "rediss",
        serializer=CompactJsonSerializer(),
        timeout=REDIS_OPERATION_TIMEOUT,
        create_connection_timeout=REDIS_OPERATION_TIMEOUT,
    )


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
    """One introspector's per-token results, namespaced so introspectors never collide."""

    def __init__(self, backend: BaseCache, name: str, namespace: str | None, stats: CacheStats) -> None:
        self.backend = backend
        self.name = name
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
        self._redis: BaseCache | None = None

    def token_cache(self, name: str, fingerprint: str) -> TokenCache:
        """The cache of introspector `name`; `fingerprint` changes when its endpoint does."""
        namespace = f"authz:v2:{name}:{hashlib.sha256(fingerprint.encode()).hexdigest()[:12]}:"
        if self.config.backend == "redis":
            assert self.config.url is not None  # guaranteed by config validation
            if self._redis is None:
                self._redis = redis_backend(self.config.url)
            return TokenCache(self._redis, name, namespace, self.stats)
        # Each introspector has its own memory cache: no namespace, so keys stay 64 characters.
        return TokenCache(BoundedMemoryCache(self.config.max_entries), name, None, self.stats)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.close()
            self._redis = None
