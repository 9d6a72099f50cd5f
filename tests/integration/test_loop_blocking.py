"""The loop-blocking detector (tests/integration/conftest.py) catches a handler that blocks the loop."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from tests.integration.conftest import SLOW_CALLBACK_SECONDS, LoopBlockDetector


async def _blocking(request: web.Request) -> web.Response:
    time.sleep(0.3)  # noqa: ASYNC251  # on purpose: the bug the detector exists to catch
    return web.Response(text="late")


async def _waiting(request: web.Request) -> web.Response:
    await asyncio.sleep(0.3)  # as long, but the loop keeps running
    return web.Response(text="late")


@pytest.fixture
async def server() -> AsyncIterator[str]:
    """A real aiohttp server on 127.0.0.1 with one blocking and one well-behaved handler."""
    app = web.Application()
    app.router.add_get("/blocking", _blocking)
    app.router.add_get("/waiting", _waiting)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_a_handler_that_sleeps_fails_the_test_and_one_that_awaits_does_not(
    server: str, loop_blocking: LoopBlockDetector, loop_may_block: None
) -> None:
    assert SLOW_CALLBACK_SECONDS < 0.3
    async with aiohttp.ClientSession() as session:
        async with session.get(server + "/waiting") as response:
            assert await response.text() == "late"
        assert loop_blocking.blocked == []
        loop_blocking.check()  # nothing blocked: passes

        async with session.get(server + "/blocking") as response:
            assert await response.text() == "late"
    assert len(loop_blocking.blocked) == 1, loop_blocking.blocked
    took = re.search(r"took ([0-9.]+) seconds", loop_blocking.blocked[0])
    assert took, loop_blocking.blocked[0]
    assert float(took[1]) >= 0.3
    # What the autouse fixture does at teardown of every other test here (this one opted out).
    with pytest.raises(pytest.fail.Exception, match="the event loop was blocked"):
        loop_blocking.check()
