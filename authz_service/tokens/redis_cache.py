"""The Redis token cache: aiocache's Redis backend (imported only when `cache.backend` is redis).

Values are compact JSON; SET with PX and aclose(), which aiocache 0.12 does not use but redis-py >= 5
wants. Every operation has a short timeout: a slow Redis is a miss, never a slow check.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote, urlsplit

from aiocache import RedisCache
from aiocache.base import BaseCache
from aiocache.serializers import BaseSerializer

REDIS_OPERATION_TIMEOUT = 0.25  # seconds; a slower cache is treated as a miss


class CompactJsonSerializer(BaseSerializer):  # type: ignore[misc]
    """Values as compact JSON text: ~250 bytes for a typical introspection answer, where the
    parsed dict with its own key and value strings costs ~1,100 in memory."""

    DEFAULT_ENCODING = "utf-8"

    def dumps(self, value: Any) -> str:
        return json.dumps(value, separators=(",", ":"))

    def loads(self, value: str | bytes | None) -> Any:
        return None if value is None else json.loads(value)


def redis_backend(url: str) -> BaseCache:
    """aiocache's Redis backend for a redis:// or rediss:// URL (JSON values)."""

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
