"""Two service processes sharing one real Redis, and the memory bound under a token flood."""

from __future__ import annotations

import tracemalloc

import grpc
import pytest
import redis.asyncio as redis

from authz_service.devstack.idp import DevIdentityProvider
from authz_service.tokens.cache import BoundedMemoryCache, CacheStats, TokenCache, token_key
from tests.conftest import Spawn, StartService, free_port, opaque_introspector
from tests.harness import Answer, AuthorizationClient, check_request


async def _check(port: int, token: str) -> Answer:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        return Answer.of(await AuthorizationClient(channel).Check(check_request(token=token), timeout=10))


@pytest.mark.slow  # two service subprocesses
async def test_two_processes_share_results_through_redis(
    idp: DevIdentityProvider, redis_url: str, spawn: Spawn
) -> None:
    config = {"cache": {"backend": "redis", "url": redis_url}, "introspectors": [opaque_introspector(idp)]}
    first, second = (await spawn(config)).port, (await spawn(config)).port
    token = idp.issue_opaque({"sub": "shared"})
    answer = await _check(first, token)
    assert answer.allowed
    assert answer.headers["x-user-id"] == "shared"
    answer = await _check(second, token)
    assert answer.allowed
    assert answer.headers["x-user-id"] == "shared"
    assert idp.hits["introspect"] == 1  # the second process found the first one's result in Redis

    client = redis.from_url(redis_url)
    keys = [k.decode() async for k in client.scan_iter("authz:*")]
    await client.aclose()
    assert any(k.endswith(token_key(token)) for k in keys)
    assert not any(token in k for k in keys)  # the token itself is never a key


async def test_redis_down_falls_back_to_the_idp(idp: DevIdentityProvider, start_service: StartService) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    service = await start_service(
        {"cache": {"backend": "redis", "url": dead}, "introspectors": [opaque_introspector(idp)]}
    )
    for token in (idp.issue_opaque(), idp.issue_opaque()):
        assert (await service.check(token=token)).allowed
    assert idp.hits["introspect"] == 2  # no token cache, but no outage either
    assert service.service.caches.stats.counts[("opaque", "error")] >= 2


@pytest.mark.slow  # 20,000 cache writes under tracemalloc
async def test_memory_levels_off_under_20k_unique_tokens(loop_may_block: None) -> None:
    # The memory cache never awaits anything real, so this loop holds the event loop for its whole run:
    # on purpose, since only the cache is measured and no server shares the loop.
    backend = BoundedMemoryCache(max_entries=2000)
    cache = TokenCache(backend, "opaque", "authz:v2:opaque:x:", CacheStats())
    result = {"active": True, "sub": "user-1", "scope": "openid profile", "exp": 4102444800}
    tracemalloc.start()
    try:
        for i in range(5000):
            await cache.set(token_key(f"token-{i}"), dict(result), 300)
        after_5k, _ = tracemalloc.get_traced_memory()
        for i in range(5000, 20000):
            await cache.set(token_key(f"token-{i}"), dict(result), 300)
        after_20k, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(backend) == 2000
    assert await cache.get(token_key("token-19999")) is not None
    assert await cache.get(token_key("token-0")) is None  # least recently used went first
    # Full at 2,000 entries well before 5,000: 15,000 more tokens must not grow memory.
    assert after_20k - after_5k < 256 * 1024, (after_5k, after_20k)
