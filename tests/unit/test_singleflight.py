"""singleflight: concurrent callers for one key share one call, its result or its exception; a
cancelled waiter never cancels the call the others wait for; a finished call frees its key."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from authz_service.singleflight import SingleFlight
from tests.unit.fakes import Gate, settle


class Upstream:
    """A call that counts itself and is held at a gate until opened."""

    def __init__(self) -> None:
        self.gate = Gate()
        self.calls: list[str] = []
        self.failure: Exception | None = None

    async def __call__(self, key: str) -> object:
        self.calls.append(key)
        await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        return object()


async def test_concurrent_callers_for_one_key_share_one_call_and_its_result() -> None:
    flights: SingleFlight[str, object] = SingleFlight()
    upstream = Upstream()
    waiters = [asyncio.ensure_future(flights.run("a", upstream, "a")) for _ in range(10)]
    await upstream.gate.reached(1)
    assert "a" in flights
    upstream.gate.open()
    results = await asyncio.gather(*waiters)
    assert upstream.calls == ["a"]
    assert all(result is results[0] for result in results)
    assert "a" not in flights
    assert len(flights) == 0


async def test_other_keys_get_their_own_calls() -> None:
    flights: SingleFlight[str, object] = SingleFlight()
    upstream = Upstream()
    waiters = [asyncio.ensure_future(flights.run(key, upstream, key)) for key in ("a", "b", "a", "b")]
    await upstream.gate.reached(2)
    assert len(flights) == 2
    upstream.gate.open()
    a1, b1, a2, b2 = await asyncio.gather(*waiters)
    assert sorted(upstream.calls) == ["a", "b"]
    assert a1 is a2
    assert b1 is b2
    assert a1 is not b1


async def test_the_exception_reaches_every_waiter() -> None:
    flights: SingleFlight[str, object] = SingleFlight()
    upstream = Upstream()
    upstream.failure = ConnectionError("down")
    waiters = [asyncio.ensure_future(flights.run("a", upstream, "a")) for _ in range(5)]
    await upstream.gate.reached(1)
    upstream.gate.open()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(result is upstream.failure for result in results)
    assert upstream.calls == ["a"]


async def test_a_cancelled_waiter_does_not_cancel_the_shared_call() -> None:
    flights: SingleFlight[str, object] = SingleFlight()
    upstream = Upstream()
    impatient = asyncio.ensure_future(flights.run("a", upstream, "a"))
    patient = asyncio.ensure_future(flights.run("a", upstream, "a"))
    await upstream.gate.reached(1)
    impatient.cancel()
    await asyncio.wait([impatient])
    assert impatient.cancelled()
    upstream.gate.open()
    assert await patient is not None
    assert upstream.calls == ["a"]


async def test_the_call_runs_to_its_end_when_every_waiter_gave_up() -> None:
    flights: SingleFlight[str, object] = SingleFlight()
    upstream = Upstream()
    finished = asyncio.Event()

    async def call() -> object:
        result = await upstream("a")
        finished.set()  # what a call stores (a cache entry, a key set) is stored
        return result

    waiter = asyncio.ensure_future(flights.run("a", call))
    await upstream.gate.reached(1)
    waiter.cancel()
    await asyncio.wait([waiter])
    upstream.gate.open()
    await asyncio.wait_for(finished.wait(), 2)
    await settle()
    assert len(flights) == 0


@pytest.mark.parametrize("abandon", ["background", "cancelled"])
async def test_a_failure_nobody_awaits_is_not_reported_as_unretrieved(abandon: str) -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        flights: SingleFlight[str, object] = SingleFlight()
        upstream = Upstream()
        upstream.failure = ConnectionError("down")
        if abandon == "background":
            future = flights.start("a", upstream, "a")
        else:
            waiter = asyncio.ensure_future(flights.run("a", upstream, "a"))
            await upstream.gate.reached(1)
            waiter.cancel()
            await asyncio.wait([waiter])
            future = flights.start("a", upstream, "a")  # the call in flight, not a new one
        await upstream.gate.reached(1)
        upstream.gate.open()
        await asyncio.wait([future])
        del future
        await settle()
        gc.collect()  # an unretrieved exception is reported when its future is collected
        assert reported == []
        assert upstream.calls == ["a"]
    finally:
        loop.set_exception_handler(None)


async def test_a_finished_call_frees_its_key() -> None:
    flights: SingleFlight[str, object] = SingleFlight()
    upstream = Upstream()
    upstream.gate.open()
    first = await flights.run("a", upstream, "a")
    second = await flights.run("a", upstream, "a")
    assert upstream.calls == ["a", "a"]
    assert first is not second


async def test_a_waiter_resumes_after_the_key_is_free() -> None:
    # A waiter that starts another call for the key as soon as it has the result (a JWKS refetch
    # right after a fetch it joined) starts a new call, never joins the finished one.
    flights: SingleFlight[str, object] = SingleFlight()
    upstream = Upstream()

    async def join_then_look() -> bool:
        await flights.run("a", upstream, "a")
        return "a" in flights

    waiter = asyncio.ensure_future(join_then_look())
    await upstream.gate.reached(1)
    upstream.gate.open()
    assert await waiter is False
