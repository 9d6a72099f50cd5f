"""Single flight: concurrent callers for one key share one call.

Used by the verified-token cache (one verification per token), the opaque token cache (one
introspection call per token) and a JWKS key source (one fetch at a time). Guarantees:
- one call per key at a time; whoever asks while it runs joins it, and gets its result or its
  exception (the same object);
- a waiter being cancelled (Envoy gave up) never cancels the shared call for the others: it runs
  to its end, so whatever it stores (a cache entry, a key set) is stored;
- a call nobody awaits (started in the background, or every waiter cancelled) that fails is not
  reported as an exception never retrieved: its callers were told, or nobody wanted it;
- once a call is done the key is free: the next caller starts a new call.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, ParamSpec, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
P = ParamSpec("P")


class SingleFlight(Generic[K, T]):
    """The calls in flight, one per key."""

    __slots__ = ("_calls",)

    def __init__(self) -> None:
        self._calls: dict[K, asyncio.Future[T]] = {}

    def __len__(self) -> int:
        return len(self._calls)

    def __contains__(self, key: K) -> bool:
        """Whether a call for `key` is in flight."""
        return key in self._calls

    async def run(self, key: K, call: Callable[P, Coroutine[Any, Any, T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Join the call in flight for `key`, or start `call(*args, **kwargs)` as it; its result."""
        # Shield: one waiter being cancelled must not cancel the call the others wait for.
        return await asyncio.shield(self.start(key, call, *args, **kwargs))

    def start(
        self, key: K, call: Callable[P, Coroutine[Any, Any, T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> asyncio.Future[T]:
        """The call in flight for `key`, or `call(*args, **kwargs)` started as it (not awaited)."""
        future = self._calls.get(key)
        if future is None:
            future = asyncio.ensure_future(call(*args, **kwargs))
            self._calls[key] = future
            # Added first, so the key is free before any waiter resumes with the result.
            future.add_done_callback(functools.partial(self._done, key))
        return future

    def _done(self, key: K, future: asyncio.Future[T]) -> None:
        if self._calls.get(key) is future:
            del self._calls[key]
        if not future.cancelled():
            future.exception()  # retrieved: every waiter got it through its shield, or nobody wanted it
