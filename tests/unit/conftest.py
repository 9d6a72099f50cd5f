"""Fixtures shared by the unit tests that talk to a canned IdP over real HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from authz_service.upstream import UpstreamClient


@pytest_asyncio.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    """The service's one hardened HTTP client, closed after the test."""
    upstream = UpstreamClient()
    yield upstream
    await upstream.close()
