"""Which event loop serves: uvloop when installed (about +20% checks/s with grpc.aio, measured
in docs/performance.md), else asyncio's. AUTHZ_EVENT_LOOP=asyncio forces asyncio's."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_name() -> str:
    """`uvloop` or `asyncio`: the loop run() will use."""
    if os.environ.get("AUTHZ_EVENT_LOOP", "auto") == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on the chosen loop."""
    if loop_name() == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
