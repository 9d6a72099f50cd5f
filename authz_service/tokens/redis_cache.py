"""The Redis token cache: redis-py's asyncio client (imported only when `cache.backend` is redis).

Values are compact JSON, written with SET ... PX (Redis keeps the TTL in milliseconds). Every
operation has a short deadline: a slow Redis is a miss, never a slow check.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as redis

from authz_service.tokens.stored import dumps, loads

REDIS_OPERATION_TIMEOUT = 0.25  # seconds; a slower cache is treated as a miss


class RedisCache:
    """A TokenCache backend on one Redis (a redis:// or rediss:// URL), shared by every introspector."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.client = redis.Redis(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            db=int(parts.path.lstrip("/") or "0"),
            password=unquote(parts.password) if parts.password else None,
            ssl=parts.scheme == "rediss",
            socket_connect_timeout=REDIS_OPERATION_TIMEOUT,
        )

    async def get(self, key: str) -> Any:
        async with asyncio.timeout(REDIS_OPERATION_TIMEOUT):
            return loads(await self.client.get(key))

    async def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        async with asyncio.timeout(REDIS_OPERATION_TIMEOUT):
            if ttl is None:
                await self.client.set(key, dumps(value))
            else:
                await self.client.set(key, dumps(value), px=max(1, int(ttl * 1000)))

    async def close(self) -> None:
        async with asyncio.timeout(REDIS_OPERATION_TIMEOUT):
            await self.client.aclose()
