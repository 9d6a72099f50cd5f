"""lru.trim_oldest: the bound of the plain-dict LRUs (VerifiedTokens, the remembered allows)."""

from __future__ import annotations

from authz_service.lru import trim_oldest


def test_nothing_goes_while_within_the_bound() -> None:
    data = {n: n for n in range(64)}
    trim_oldest(data, 64)
    assert list(data) == list(range(64))


def test_one_over_the_bound_drops_the_oldest_sixty_fourth() -> None:
    data = {n: n for n in range(129)}
    trim_oldest(data, 128)
    assert list(data) == list(range(2, 129))  # 128 // 64 = 2 oldest at once


def test_a_reinserted_key_counts_as_newest() -> None:
    data = {n: n for n in range(4)}
    data[0] = data.pop(0)
    data[4] = 4
    trim_oldest(data, 4)
    assert list(data) == [2, 3, 0, 4]


def test_a_bound_below_64_drops_one_at_a_time() -> None:
    data = {n: n for n in range(11)}
    trim_oldest(data, 10)
    assert list(data) == list(range(1, 11))


def test_far_over_the_bound_comes_back_within_it() -> None:
    data = {n: n for n in range(1000)}
    trim_oldest(data, 100)
    assert len(data) <= 100
    assert list(data)[-1] == 999
