"""Integration tests fail when a callback blocks the event loop (as aiohttp's own tests do).

Every test here runs its loop in asyncio debug mode, where the loop logs `Executing <handle> took
X seconds` for any callback that ran longer than `slow_callback_duration`. The autouse fixture
collects those records and fails the test at teardown. The threshold sits above what this suite
does legitimately on a busy 2-core machine (the longest callbacks measured: ~0.1 s, in service
start-up and first imports) and below a `time.sleep(0.3)` in a handler, which
test_loop_blocking.py proves is caught.

Test code blocks the loop too: make identity providers with `tests.conftest.new_idp` (its RSA key
takes up to ~0.15 s to generate, off the loop there), and request `loop_may_block` in a test that
holds the loop on purpose.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from types import TracebackType

import pytest

# The policy engines are imported on first use (policy/__init__.py). A test whose own config is the
# first to use one would pay that import, and on a fresh checkout its bytecode compile, on the
# loop: not the stall this detector is for, so they are imported here, before any loop runs.
import authz_service.policy.complex
import authz_service.policy.matcho
import authz_service.policy.schema  # noqa: F401

SLOW_CALLBACK_SECONDS = 0.25


class LoopBlockDetector(logging.Handler):
    """Puts a loop in debug mode and keeps asyncio's slow-callback warnings while installed."""

    def __init__(self, loop: asyncio.AbstractEventLoop, threshold: float = SLOW_CALLBACK_SECONDS) -> None:
        super().__init__(logging.WARNING)
        self.loop = loop
        self.threshold = threshold
        self.blocked: list[str] = []
        self._saved = (loop.get_debug(), loop.slow_callback_duration)

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith("Executing "):
            self.blocked.append(record.getMessage())

    def __enter__(self) -> LoopBlockDetector:
        self.loop.set_debug(True)
        self.loop.slow_callback_duration = self.threshold
        logging.getLogger("asyncio").addHandler(self)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        logging.getLogger("asyncio").removeHandler(self)
        debug, duration = self._saved
        self.loop.slow_callback_duration = duration
        self.loop.set_debug(debug)

    def check(self) -> None:
        """Fail the current test if anything blocked the loop for `threshold` seconds or more."""
        if self.blocked:
            pytest.fail(
                f"the event loop was blocked for >= {self.threshold:g} s:\n" + "\n".join(self.blocked), pytrace=False
            )


@pytest.fixture
def loop_may_block() -> None:
    """Requested by a test that blocks the loop on purpose: the detector reports, but does not fail it."""


@pytest.fixture(autouse=True)
async def loop_blocking(request: pytest.FixtureRequest) -> AsyncIterator[LoopBlockDetector]:
    """Fail the test (at teardown) when any callback, of the test or of the servers it started, blocked the loop."""
    with LoopBlockDetector(asyncio.get_running_loop()) as detector:
        yield detector
    if "loop_may_block" not in request.fixturenames:
        detector.check()
