"""Least-recently-used bounds for plain dicts, used where an entry's bytes count (100k of them).

A dict keeps insertion order and re-inserting a key moves it to the end, so a dict whose readers
pop and re-insert what they use is an LRU with the oldest entries first. It costs ~50 bytes an
entry less than an OrderedDict's extra links.
"""

from __future__ import annotations

import itertools
from typing import Any


def trim_oldest(data: dict[Any, Any], max_entries: int) -> None:
    """Drop the oldest entries once `data` holds more than `max_entries`: 1/64 of them at once.

    Finding a dict's first entry scans past the slots earlier deletions left, so one scan for
    many inserts (rather than one per insert) keeps eviction O(1) amortized."""
    if len(data) > max_entries:
        excess = len(data) - max_entries + max(max_entries // 64, 1) - 1
        for stale in list(itertools.islice(data, excess)):
            del data[stale]
