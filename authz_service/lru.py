"""A bounded least-recently-used map over a plain dict, for caches whose entries' bytes count.

A dict keeps insertion order, and popping and re-inserting a key moves it to the end: a dict is
an LRU with its oldest entries first, ~50 bytes an entry smaller than an OrderedDict's links.

What a dict does not do is shrink. Each pop leaves a dead slot behind, and once the slots run out
CPython moves the live entries to a table sized for three times their number, rounded up to a
power of two. At the default 100,000 entries that is 2^19 slots, where a dict built by inserting
the same entries has 2^18: 10.5 MB against 5.2 MB, of which a cache in service (every hit a pop
and a re-insert) keeps ~7 MB touched (measured by bench/ rss-100k: 146.4 MB after the fill, 153.3
MB after every token was asked again). So the map rebuilds its dict in place, in order, once
dead slots number half its length: the table stays the size insertion gives it. A rebuild of
100,000 entries takes ~7-11 ms on the loop, once per 50,000 hits or evictions; CPython's own
resize, which it forestalls, costs as much.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

# Fewer dead slots than this never rebuild: a small or single-entry map (one token, hit on every
# Check) must not copy itself on every hit.
MIN_REBUILD_AFTER = 4096


class Lru(Generic[K, V]):
    """A map of at most `max_entries`, least recently used first; values are never None."""

    __slots__ = ("_data", "_dead", "_rebuild_at", "max_entries")

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._data: dict[K, V] = {}
        self._dead = 0  # entries removed (slots left dead) since the dict was last built
        self._rebuild_at = MIN_REBUILD_AFTER

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator[K]:
        """Keys, least recently used first."""
        return iter(self._data)

    def peek(self, key: K) -> V | None:
        """The value, without counting it as used."""
        return self._data.get(key)

    def get(self, key: K) -> V | None:
        """The value, now the most recently used."""
        value = self._data.get(key)
        if value is not None:
            self.touch(key)
        return value

    def touch(self, key: K) -> None:
        """Count a key held as just used (after `peek`)."""
        data = self._data
        data[key] = data.pop(key)  # re-inserted: now the newest, its old slot dead
        self._died(1)

    def put(self, key: K, value: V) -> None:
        """Set the value, the most recently used; past the bound the oldest go (see _evict)."""
        data = self._data
        if data.pop(key, None) is not None:
            self._died(1)
        data[key] = value
        if len(data) > self.max_entries:
            self._evict(len(data) - self.max_entries)

    def _evict(self, over: int) -> None:
        """Drop the `over` oldest entries, and as many more as make 1/64 of the bound at once.

        Finding a dict's first entry scans past the slots earlier deletions left, so one scan for
        many inserts (rather than one per insert) keeps eviction O(1) amortized."""
        data = self._data
        excess = over + max(self.max_entries // 64, 1) - 1
        for stale in list(itertools.islice(data, excess)):
            del data[stale]
        self._died(excess)

    def replace(self, key: K, value: V) -> None:
        """Set the value of a key already held, keeping its place."""
        self._data[key] = value

    def discard(self, key: K) -> None:
        """Forget a key, if held."""
        if self._data.pop(key, None) is not None:
            self._died(1)

    def _died(self, count: int) -> None:
        self._dead += count
        if self._dead > self._rebuild_at:
            self.rebuild()

    def rebuild(self) -> None:
        """Build the dict again from its entries, in order: a table sized for what it holds."""
        data = self._data
        keys, values = list(data), list(data.values())
        data.clear()
        data.update(zip(keys, values, strict=True))
        self._dead = 0
        self._rebuild_at = max(len(data) >> 1, MIN_REBUILD_AFTER)


class ExactLru(Lru[K, V]):
    """An Lru that evicts exactly down to its bound (the token cache's `max_entries` is exact).

    Still O(1) amortized: one scan takes the oldest 1/64 as a queue of victims, evicted one at a
    time as inserts need room. A victim used (or put, or dropped) since the scan leaves the queue,
    so what is left of it is always the oldest entries, in order.
    """

    __slots__ = ("_queue", "_victims")

    def __init__(self, max_entries: int) -> None:
        super().__init__(max_entries)
        self._queue: list[K] = []  # the victims, the oldest last
        self._victims: set[K] = set()  # those of them not used since the scan

    def touch(self, key: K) -> None:
        self._victims.discard(key)
        super().touch(key)

    def put(self, key: K, value: V) -> None:
        self._victims.discard(key)
        super().put(key, value)

    def discard(self, key: K) -> None:
        self._victims.discard(key)
        super().discard(key)

    def _evict(self, over: int) -> None:
        data, queue, victims = self._data, self._queue, self._victims
        for _ in range(over):
            while True:
                if not queue:
                    queue.extend(itertools.islice(data, max(self.max_entries // 64, 1)))
                    queue.reverse()
                    victims.clear()
                    victims.update(queue)
                key = queue.pop()
                if key in victims:
                    victims.remove(key)
                    break
            del data[key]
        self._died(over)
