"""lru.Lru: the bounded LRU of the verified-token cache and of the remembered answers; lru.ExactLru:
the same map with an exact bound, under the memory token cache."""

from __future__ import annotations

import random
import sys

from authz_service.lru import MIN_REBUILD_AFTER, ExactLru, Lru


def filled(count: int, max_entries: int | None = None) -> Lru[int, str]:
    lru: Lru[int, str] = Lru(max_entries or count)
    for n in range(count):
        lru.put(n, f"v{n}")
    return lru


def test_nothing_goes_while_within_the_bound() -> None:
    lru = filled(64)
    assert list(lru) == list(range(64))


def test_one_over_the_bound_drops_the_oldest_sixty_fourth() -> None:
    lru = filled(128)
    lru.put(128, "v128")
    assert list(lru) == list(range(2, 129))  # 128 // 64 = 2 oldest at once


def test_a_bound_below_64_drops_one_at_a_time() -> None:
    lru = filled(10)
    lru.put(10, "v10")
    assert list(lru) == list(range(1, 11))


def test_get_and_touch_make_a_key_the_newest_and_peek_does_not() -> None:
    lru = filled(4)
    assert lru.get(0) == "v0"
    assert list(lru) == [1, 2, 3, 0]
    assert lru.peek(1) == "v1"
    assert list(lru) == [1, 2, 3, 0]
    lru.touch(1)
    assert list(lru) == [2, 3, 0, 1]
    lru.put(4, "v4")  # over the bound of 4: the least recently used (2) goes
    assert list(lru) == [3, 0, 1, 4]
    assert lru.get(2) is None


def test_replace_keeps_the_place_and_discard_forgets() -> None:
    lru = filled(3)
    lru.replace(0, "new")
    assert list(lru) == [0, 1, 2]
    assert lru.peek(0) == "new"
    lru.discard(1)
    lru.discard(99)
    assert list(lru) == [0, 2]
    assert len(lru) == 2


def test_the_bound_can_change_and_applies_at_the_next_put() -> None:
    lru = filled(100)
    lru.max_entries = 10
    lru.put(100, "v100")
    assert len(lru) <= 10
    assert list(lru)[-1] == 100


def test_hits_do_not_grow_the_table_beyond_what_insertion_gives() -> None:
    # 6,000 entries: a dict built by inserting them has 2^14 slots. Every hit pops and re-inserts,
    # leaving a dead slot; without rebuilding, CPython resizes to 2^15 after ~4,900 hits.
    lru = filled(6000)
    built = sys.getsizeof(lru._data)
    for round_ in range(5):
        for n in range(6000):
            assert lru.get(n) == f"v{n}"
        assert sys.getsizeof(lru._data) <= built, round_
    assert list(lru) == list(range(6000))  # the rebuilds kept the order


def test_evictions_do_not_grow_the_table_either() -> None:
    lru = filled(6000)
    built = sys.getsizeof(lru._data)
    for n in range(6000, 60_000):
        lru.put(n, f"v{n}")
        assert len(lru) <= 6000
    assert sys.getsizeof(lru._data) <= built
    assert list(lru)[-1] == 59_999


def test_a_single_hot_key_is_not_rebuilt_on_every_hit() -> None:
    lru = filled(1)
    data = lru._data
    for _ in range(MIN_REBUILD_AFTER):
        lru.get(0)
    assert lru._dead == MIN_REBUILD_AFTER  # no rebuild yet: the threshold has a floor
    lru.get(0)
    assert lru._dead == 0
    assert lru._data is data  # rebuilt in place: whoever holds the map holds the same dict
    assert lru.peek(0) == "v0"


# --------------------------------------------------------------------------- ExactLru


def exact(count: int, max_entries: int | None = None) -> ExactLru[int, str]:
    lru: ExactLru[int, str] = ExactLru(max_entries or count)
    for n in range(count):
        lru.put(n, f"v{n}")
    return lru


def test_exact_evicts_exactly_down_to_the_bound() -> None:
    lru = exact(6400)
    for n in range(6400, 20_000):
        lru.put(n, f"v{n}")
        assert len(lru) == 6400
    assert list(lru) == list(range(20_000 - 6400, 20_000))


def test_exact_evicts_the_least_recently_used_even_after_its_scan() -> None:
    lru = exact(640)
    lru.put(640, "v640")  # the scan took the 10 oldest (0..9) as victims; 0 went
    lru.touch(1)  # a victim used since the scan is no longer one
    lru.get(2)
    lru.put(3, "new")
    lru.discard(4)
    for n in range(641, 647):
        lru.put(n, f"v{n}")
    assert lru.peek(1) == "v1"
    assert lru.peek(2) == "v2"
    assert lru.peek(3) == "new"
    assert list(lru)[:3] == [10, 11, 12]  # 5..9 went (4 was dropped, 1..3 used since the scan)


def test_exact_matches_a_reference_lru_under_random_use() -> None:
    rng = random.Random(7)
    lru: ExactLru[int, int] = ExactLru(200)
    reference: dict[int, int] = {}
    for step in range(60_000):
        key = rng.randrange(600)
        action = rng.random()
        if action < 0.5:
            lru.put(key, step)
            reference.pop(key, None)
            reference[key] = step
            while len(reference) > 200:
                del reference[next(iter(reference))]
        elif action < 0.9:
            assert lru.get(key) == reference.get(key)
            if key in reference:
                reference[key] = reference.pop(key)
        else:
            lru.discard(key)
            reference.pop(key, None)
    assert list(lru) == list(reference)
    assert [lru.peek(k) for k in lru] == list(reference.values())
