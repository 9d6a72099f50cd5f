"""cache: a bounded LRU with TTLs on an injected clock, per-introspector token caches that never fail a
request, and keys that are SHA-256 of the token."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio

from authz_service.config.model import CacheConfig
from authz_service.tokens.cache import (
    BoundedMemoryCache,
    CacheFactory,
    CacheStats,
    TokenCache,
    token_key,
)
from authz_service.tokens.redis_cache import REDIS_OPERATION_TIMEOUT, RedisCache
from authz_service.tokens.stored import dumps, loads
from tests.unit.fakes import CannedIdp, FakeClock

ANSWER = {"active": True, "sub": "user-1", "exp": 1_800_000_300}


def test_token_key_is_the_sha256_of_the_token() -> None:
    token = "2YotnFZFEjr1zCsicMWpAA"
    key = token_key(token)
    assert key == hashlib.sha256(token.encode()).hexdigest()
    assert len(key) == 64
    assert token not in key


def test_values_are_compact_json() -> None:
    text = dumps({"result": ANSWER, "until": 1.5})
    assert " " not in text
    assert loads(text) == {"result": ANSWER, "until": 1.5}
    assert loads(None) is None


# --------------------------------------------------------------------------- BoundedMemoryCache


async def test_entry_lives_for_its_ttl_on_the_injected_clock() -> None:
    clock = FakeClock()
    cache = BoundedMemoryCache(10, clock=clock)
    await cache.set("k", ANSWER, ttl=30)
    clock.advance(29.9)
    assert await cache.get("k") == ANSWER
    clock.advance(0.1)
    assert await cache.get("k") is None
    assert len(cache) == 0  # an expired entry is dropped, not kept


async def test_entry_without_ttl_does_not_expire() -> None:
    clock = FakeClock()
    cache = BoundedMemoryCache(10, clock=clock)
    await cache.set("k", ANSWER)
    clock.advance(10**9)
    assert await cache.get("k") == ANSWER


async def test_bounded_evicting_the_least_recently_used() -> None:
    cache = BoundedMemoryCache(2, clock=FakeClock())
    await cache.set("a", 1, ttl=60)
    await cache.set("b", 2, ttl=60)
    assert await cache.get("a") == 1  # a is now more recent than b
    await cache.set("c", 3, ttl=60)
    assert len(cache) == 2
    assert await cache.get("b") is None
    assert await cache.get("a") == 1
    assert await cache.get("c") == 3


async def test_a_flood_of_unique_tokens_stays_bounded() -> None:
    cache = BoundedMemoryCache(100, clock=FakeClock())
    for i in range(1000):
        await cache.set(token_key(f"t{i}"), ANSWER, ttl=60)
    assert len(cache) == 100


async def test_overwrite_delete_exists_clear() -> None:
    clock = FakeClock()
    cache = BoundedMemoryCache(10, clock=clock)
    await cache.set("ns:a", 1, ttl=60)
    await cache.set("ns:a", 2, ttl=60)
    await cache.set("other:b", 3, ttl=60)
    assert await cache.get("ns:a") == 2
    assert await cache.exists("ns:a")
    assert await cache.delete("ns:a") == 1
    assert await cache.delete("ns:a") == 0
    assert not await cache.exists("ns:a")
    await cache.set("ns:c", 4, ttl=60)
    await cache.clear(namespace="ns:")
    assert await cache.get("ns:c") is None
    assert await cache.get("other:b") == 3
    await cache.clear()
    assert len(cache) == 0


# --------------------------------------------------------------------------- TokenCache


async def test_introspectors_sharing_a_backend_never_see_each_others_entries() -> None:
    backend = BoundedMemoryCache(10, clock=FakeClock())
    stats = CacheStats()
    a = TokenCache(backend, "a", "authz:v2:a:", stats)
    b = TokenCache(backend, "b", "authz:v2:b:", stats)
    await a.set(token_key("t"), ANSWER, ttl=60)
    assert await a.get(token_key("t")) == ANSWER
    assert await b.get(token_key("t")) is None


async def test_hits_and_misses_are_counted_and_reported() -> None:
    events: list[tuple[str, str]] = []
    stats = CacheStats(lambda cache, event: events.append((cache, event)))
    cache = TokenCache(BoundedMemoryCache(10, clock=FakeClock()), "ext", None, stats)
    await cache.get("k")
    await cache.set("k", ANSWER, ttl=60)
    await cache.get("k")
    assert events == [("ext", "miss"), ("ext", "hit")]
    assert stats.counts[("ext", "hit")] == 1
    assert stats.counts[("ext", "miss")] == 1


class BrokenBackend:
    """A cache backend that fails every operation (Redis down, or slower than its timeout)."""

    async def get(self, key: str) -> Any:
        raise ConnectionError("cache down")

    async def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        raise ConnectionError("cache down")

    async def close(self) -> None:
        """Nothing to release."""


async def test_a_failing_backend_is_a_miss_never_an_error(caplog: pytest.LogCaptureFixture) -> None:
    stats = CacheStats()
    cache = TokenCache(BrokenBackend(), "ext", None, stats)
    await cache.set("k", ANSWER, ttl=60)
    assert await cache.get("k") is None
    assert stats.counts[("ext", "error")] == 2
    assert "cache down" not in caplog.text  # the type only: a backend message could quote a key or value


# --------------------------------------------------------------------------- CacheFactory


async def test_memory_caches_are_one_per_introspector() -> None:
    factory = CacheFactory(CacheConfig(backend="memory", max_entries=5))
    a = factory.token_cache("a", "https://a.example/introspect")
    b = factory.token_cache("b", "https://b.example/introspect")
    await a.set("k", ANSWER, ttl=60)
    assert await b.get("k") is None
    assert isinstance(a.backend, BoundedMemoryCache)
    assert a.backend.max_entries == 5
    assert a.backend is not b.backend


async def test_factory_counts_every_cache_in_one_place() -> None:
    events: list[tuple[str, str]] = []
    factory = CacheFactory(CacheConfig(), on_event=lambda cache, event: events.append((cache, event)))
    await factory.token_cache("a", "u1").get("k")
    await factory.token_cache("b", "u2").get("k")
    assert events == [("a", "miss"), ("b", "miss")]
    assert factory.stats.counts[("a", "miss")] == 1


@pytest_asyncio.fixture
async def closed_port() -> AsyncIterator[int]:
    """A loopback port nothing listens on (a server was there a moment ago)."""
    server = CannedIdp()
    await server.start()
    port = server.port
    await server.stop()
    yield port


async def test_redis_caches_share_one_server_never_each_others_entries(redis_url: str) -> None:
    # Real redis-server (the session fixture): values round-trip as JSON, introspectors stay apart.
    factory = CacheFactory(CacheConfig(backend="redis", url=redis_url))
    a = factory.token_cache("unit-a", "https://a.example/introspect")
    b = factory.token_cache("unit-b", "https://b.example/introspect")
    assert a.backend is b.backend
    assert isinstance(a.backend, RedisCache)
    key = token_key("unit-cache-token")
    await a.set(key, {"result": ANSWER, "until": 1.5}, ttl=60)
    assert await a.get(key) == {"result": ANSWER, "until": 1.5}
    assert await b.get(key) is None
    await factory.close()


async def test_redis_holds_hashes_never_tokens(redis_url: str) -> None:
    token = "unit-cache-secret-token-5b1f"
    factory = CacheFactory(CacheConfig(backend="redis", url=redis_url))
    await factory.token_cache("unit-c", "https://c.example/introspect").set(token_key(token), ANSWER, ttl=60)
    await factory.close()
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        keys = [str(k) for k in await client.keys("*unit-c*")]
    finally:
        await client.aclose()
    assert len(keys) == 1
    assert token not in keys[0]
    assert keys[0].endswith(token_key(token))


async def test_unreachable_redis_is_a_fast_miss(closed_port: int) -> None:
    factory = CacheFactory(CacheConfig(backend="redis", url=f"redis://127.0.0.1:{closed_port}/0"))
    cache = factory.token_cache("ext", "https://idp.example/introspect")
    started = time.monotonic()
    assert await cache.get(token_key("t")) is None
    await cache.set(token_key("t"), ANSWER, ttl=60)
    assert time.monotonic() - started < 4 * REDIS_OPERATION_TIMEOUT
    assert factory.stats.counts[("ext", "error")] == 2
    await factory.close()


def test_a_memory_only_service_never_imports_redis() -> None:
    # redis-py is ~7 MB of RSS; the memory backend does not need it (nor aiocache, which we no longer use).
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import authz_service.server.service\n"
        "from authz_service.tokens.cache import CacheFactory\n"
        "from authz_service.config.model import CacheConfig\n"
        "CacheFactory(CacheConfig()).token_cache('a', 'u')\n"
        "print(sorted(m for m in ('redis', 'aiocache') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"
