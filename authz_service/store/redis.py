"""The Redis store (`api.store: {backend: redis, url, prefix}`), for many replicas on one Redis.

Keys, under `prefix` (default `authz:resources`):
- `<prefix>:data`, a hash: field `<resourceType>/<id>`, value the resource as JSON;
- `<prefix>:generation`, a counter, incremented in the same MULTI/EXEC as every write;
- channel `<prefix>:changes`, published to in that same transaction.
A write WATCHes the counter, reads, lets the caller validate and plan, and commits in one
MULTI/EXEC (the counter set to one more than it was, or than the writer's `floor`: see
`update`); a concurrent writer makes EXEC fail and the write starts over on the new content,
so writes from every replica are serialized. Readers are told of a write by the channel and,
should they miss the message (a reconnect), by polling the counter every second.

The store is only as durable as the Redis behind it: run it with persistence (AOF) if the
resources must survive a Redis restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, WatchError

from authz_service import strictjson
from authz_service.errors import ConfigError, Problem
from authz_service.store.base import (
    KINDS,
    Key,
    Plan,
    Resource,
    ResourceStore,
    Snapshot,
    StoreError,
    id_problem,
    normalized,
)
from authz_service.store.resources import json_problem

log = logging.getLogger(__name__)

OPERATION_TIMEOUT = 1.0  # seconds; connect and each command
WRITE_ATTEMPTS = 50


class RedisStore(ResourceStore):
    """Resources in a Redis hash, with a change counter and a change channel."""

    backend = "redis"
    poll_interval = 1.0

    def __init__(self, url: str, prefix: str = "authz:resources") -> None:
        parts = urlsplit(url)
        self._where = f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path or '/0'}"
        self._client: Redis = Redis.from_url(
            url,
            socket_timeout=OPERATION_TIMEOUT,
            socket_connect_timeout=OPERATION_TIMEOUT,
            # One retry on a fresh connection: after a Redis restart, pooled connections are dead.
            retry=Retry(NoBackoff(), 1),
        )
        self.data_key = f"{prefix}:data"
        self.generation_key = f"{prefix}:generation"
        self.channel = f"{prefix}:changes"
        self._listener: asyncio.Task[None] | None = None
        self._writing = asyncio.Lock()

    @property
    def description(self) -> str:
        return f"redis store {self._where}"

    async def open(self) -> None:
        await super().open()
        self._listener = asyncio.ensure_future(self._listen())

    async def load(self) -> Snapshot:
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hgetall(self.data_key)
                pipe.get(self.generation_key)
                data, generation = await pipe.execute()
        except (RedisError, OSError) as err:
            raise self._unreachable(err) from err
        return self._snapshot(data, generation)

    async def version(self) -> str:
        try:
            generation = await self._client.get(self.generation_key)
        except (RedisError, OSError) as err:
            raise self._unreachable(err) from err
        return _version(generation)

    async def update(self, plan: Plan, *, floor: int | None = None) -> Snapshot:
        async with self._writing:  # this process's writes one at a time: only other processes race
            return await self._update(plan, floor or 0)

    async def _update(self, plan: Plan, floor: int) -> Snapshot:
        for attempt in range(WRITE_ATTEMPTS):
            if attempt:
                await asyncio.sleep(random.uniform(0, 0.01 * min(attempt, 10)))  # let the other writer finish
            try:
                async with self._client.pipeline(transaction=True) as pipe:
                    await pipe.watch(self.generation_key)
                    data = await pipe.hgetall(self.data_key)
                    current = self._snapshot(data, await pipe.get(self.generation_key))
                    planned = await asyncio.to_thread(plan, current)
                    changes = [c for c in planned if current.resources.get(c.key) != c.resource]
                    if not changes:
                        await pipe.unwatch()  # type: ignore[no-untyped-call]
                        return current
                    # The counter is WATCHed: SET is as safe as INCR, and lifts a counter that went back
                    # (a restart without the data) above what the writing process decides with.
                    generation = max(current.generation or 0, floor) + 1
                    pipe.multi()  # type: ignore[no-untyped-call]
                    for change in changes:
                        field = f"{change.key[0]}/{change.key[1]}"
                        if change.resource is None:
                            pipe.hdel(self.data_key, field)
                        else:
                            pipe.hset(self.data_key, field, json.dumps(change.resource, ensure_ascii=False))
                    pipe.set(self.generation_key, generation)
                    pipe.publish(self.channel, "changed")
                    await pipe.execute()
            except WatchError:
                continue  # another writer committed first: plan again on what it wrote
            except (RedisError, OSError) as err:
                raise self._unreachable(err) from err
            if generation > (current.generation or 0) + 1:
                log.warning(
                    "the store's change counter was behind what this process decides with; the write lifts it",
                    extra={"fields": {"store": self.description, "was": current.generation, "now": generation}},
                )
            return Snapshot(str(generation), current.changed(changes), generation)
        raise StoreError(f"the {self.description} kept changing under this write; try again")

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()

    async def _listen(self) -> None:
        """Subscribe to the change channel for good; after any break, resubscribe (and announce,
        since a message may have been missed meanwhile)."""
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                self.announce()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if message is not None:
                        self.announce()
            except (RedisError, OSError):
                await asyncio.sleep(self.poll_interval)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()

    def _unreachable(self, err: BaseException) -> StoreError:
        # The type only: redis-py's messages name the host, never the password, but keep it terse.
        return StoreError(f"the {self.description} is unreachable ({type(err).__name__})")

    def _snapshot(self, data: Mapping[Any, Any], generation: Any) -> Snapshot:
        resources: dict[Key, Resource] = {}
        problems: list[Problem] = []
        for raw_field, raw_value in data.items():
            field = raw_field.decode("utf-8", errors="replace") if isinstance(raw_field, bytes) else str(raw_field)
            kind, _, ident = field.partition("/")
            where = f"store entry {field[:100]!r}"
            if kind not in KINDS or id_problem(ident) is not None:
                problems.append(Problem(where, "", "is not <resourceType>/<id>"))
                continue
            try:
                resource = strictjson.loads(raw_value)
            except (ValueError, RecursionError):
                problems.append(Problem(where, "", "is not a JSON resource"))
                continue
            if not isinstance(resource, dict) or resource.get("resourceType", kind) != kind:
                problems.append(Problem(where, "", f"is not a {kind} resource"))
                continue
            problem = json_problem(resource)
            if problem is not None:
                problems.append(Problem(where, "", problem))
                continue
            resources[(kind, ident)] = normalized(kind, ident, resource)
        if problems:
            raise ConfigError(problems)
        number = int(generation) if generation is not None else 0
        return Snapshot(_version(generation), resources, number)


def _version(generation: bytes | str | int | None) -> str:
    if generation is None:
        return "0"
    return generation.decode() if isinstance(generation, bytes) else str(generation)
